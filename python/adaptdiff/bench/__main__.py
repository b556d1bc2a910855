"""``python -m adaptdiff.bench ...``: the same as ``adaptdiff bench ...``."""

import sys

from .cli import main

sys.exit(main())
