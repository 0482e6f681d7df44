"""`python -m benchmarks ...`: the benchmark harness (see `benchmarks.harness` for the options)."""
import sys

from benchmarks.harness import main

sys.exit(main())
