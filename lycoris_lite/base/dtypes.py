"""The floating-point dtypes adapters are written and run in, by the names the command line, the trainer
and the web UI take."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
