"""``python -m lycoris_lite inspect FILE`` / ``convert IN OUT --to FORMAT``: see :mod:`lycoris_lite.integrations.cli`."""

import sys

from .integrations.cli import main

sys.exit(main())
