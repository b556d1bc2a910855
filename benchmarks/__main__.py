"""``python -m benchmarks ...`` in the source tree: an alias of ``adaptdiff bench ...``; the
suite itself is :mod:`adaptdiff.bench`, and the recorded results are in ``results/``."""

import sys

from adaptdiff.bench import main

sys.exit(main())
