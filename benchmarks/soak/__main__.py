"""``python -m benchmarks.soak``: the soak test (:mod:`benchmarks.soak`; ``--help`` for the options)."""

import sys

from benchmarks.soak.run import main

sys.exit(main())
