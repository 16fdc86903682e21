"""`python -m fastcsm.server [flags]`: `fastcsm serve [flags]`, through the same parser and errors."""

import sys

from .cli import main

sys.exit(main())
