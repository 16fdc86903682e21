"""`python -m fastcsm.server [flags]`: the same as `fastcsm serve [flags]`."""

import sys

from .cli import main

sys.exit(main())
