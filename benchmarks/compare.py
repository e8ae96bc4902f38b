"""`python benchmarks/compare.py ARGS` = `adakv bench compare ARGS` (adakv_vllm/bench/compare.py)."""

import sys

from adakv_vllm.bench.compare import main

if __name__ == "__main__":
    sys.exit(main())
