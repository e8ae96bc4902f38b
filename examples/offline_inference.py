"""AdaKV through vLLM's offline API: `LLM(...)` with the plugin on at its defaults, on the embedded
SmolLM2-135M. Prints each generation and the KV capacity the engine got.

    .venv/bin/python examples/offline_inference.py

VLLM_CPU_KVCACHE_SPACE (GiB) sets the KV memory on CPU; without it vLLM reserves
gpu_memory_utilization (0.92) of the NUMA node's memory and refuses to start when less is free.
The EngineCore log line `AdaKV active: ...` states the options, the page format and the capacity
against bf16 in the same memory.
"""

import os

from vllm import LLM, SamplingParams

from adakv_vllm.model_store import resolve_model  # the embedded model; any HF id or folder works

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
]


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    llm = LLM(resolve_model(None), additional_config={"kv_cache_plugin": "adakv"})
    for output in llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=32)):
        print(f"{output.prompt!r} -> {output.outputs[0].text!r}")
    cache = llm.llm_engine.vllm_config.cache_config
    print(
        f"KV capacity: {cache.num_gpu_blocks * cache.block_size:,} tokens ({cache.num_gpu_blocks:,} blocks "
        f"of {cache.block_size}) in VLLM_CPU_KVCACHE_SPACE={os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB"
    )


if __name__ == "__main__":  # vLLM starts its engine in child processes
    main()
