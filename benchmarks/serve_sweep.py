"""`python benchmarks/serve_sweep.py ARGS`: `adakv serve` stock vs AdaKV under vLLM's own client at a
sweep of request rates (adakv_vllm/bench/serve_sweep.py)."""

import sys

from adakv_vllm.bench.serve_sweep import main

if __name__ == "__main__":
    sys.exit(main())
