"""``python -m lycoris_lite inspect FILE`` / ``convert IN OUT --to FORMAT``: see :mod:`lycoris_lite.cli`."""

import sys

from .cli import main

sys.exit(main())
