"""Run a script as ``accelerate launch`` would, with accelerate's FSDP on CPU processes (tests only):
``accelerate launch --config_file pipelines/accelerate_fsdp.yaml tests/accelerate_fsdp_cpu.py SCRIPT ARGS``.

accelerate (1.16) turns an FSDP config into ``DistributedType.FSDP`` only for accelerator devices:
``AcceleratorState.__init__`` (``accelerate/state.py``) sets it inside the branch for
``MULTI_GPU``/``MULTI_NPU``/… , and on a CPU machine ``PartialState._prepare_backend`` has made the processes
``MULTI_CPU`` (gloo), so the FSDP plugin is dropped and the run is plain data parallelism. Nothing else in
accelerate's FSDP2 path needs a GPU: ``Accelerator.prepare`` → ``_prepare_fsdp2`` → ``fsdp2_prepare_model``
(torch's ``fully_shard``, which runs on CPU with gloo). This launcher makes that one decision the way the
accelerator branch makes it (the same assignments), then runs ``SCRIPT`` unchanged.
"""

from __future__ import annotations

import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    fresh = not AcceleratorState._shared_state
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fresh and fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


if __name__ == "__main__":
    AcceleratorState.__init__ = _init_fsdp_on_cpu
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
