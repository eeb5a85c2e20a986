"""``python -m hoe_core``: see :mod:`hoe_core.cli`."""

import sys

from hoe_core.cli import main

sys.exit(main())
