"""Benchmarks against stock vLLM, each config at its own defaults, side by side.

compare.py (`adakv bench compare`) runs each config in a fresh `python -m adakv_vllm.bench.compare_engine`
process per round and reports min / median and ratios against bf16 (compare_report.py, figures.py);
serve_sweep.py starts `adakv serve` stock and with the plugin in turn and drives vLLM's own client
through a request-rate sweep. provenance.py records what ran. Like eval/, this package drives whole
vLLM engines and imports vLLM only inside the engine process's functions.
"""
