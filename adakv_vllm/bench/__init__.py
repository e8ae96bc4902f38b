"""`adakv bench compare`: stock vLLM (bf16, fp8) and AdaKV side by side, one engine process each.

compare.py plans the configs, runs each in a fresh `python -m adakv_vllm.bench.compare_engine`
process, and reports ratios against bf16; compare_engine.py measures one config. Like eval/, this
package drives whole vLLM engines and imports vLLM only inside the engine process's functions.
"""
