"""``python -m benchmarks``: the benchmark suite (:mod:`benchmarks.suite`; ``--help`` for the options)."""

import sys

from benchmarks.suite import main

sys.exit(main())
