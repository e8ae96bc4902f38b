"""Offline throughput with the plugin off and on, each engine at its own defaults: the same random
prompts through `LLM(model)` (stock vLLM) and `LLM(model, additional_config={"kv_cache_plugin":
"adakv"})`, one engine at a time, each in a fresh subprocess.

    .venv/bin/python examples/benchmark_throughput.py [--num-prompts 32 --input-len 512 --output-len 128]

A short sketch; `adakv bench compare` is the full benchmark (repeats in alternating order, decode
latency cold and warm, KV capacity, memory).
"""

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = {"stock": {"kv_cache_plugin": "none"}, "adakv": {"kv_cache_plugin": "adakv"}}


def measure(config: str, args: argparse.Namespace) -> dict:
    """In the child: build the engine, run every prompt in one generate call, time it."""
    import numpy as np
    from vllm import LLM, SamplingParams

    from adakv_vllm.model_store import resolve_model

    llm = LLM(resolve_model(None), additional_config=CONFIGS[config])
    rng = np.random.default_rng(0)  # the same prompts in both children; ids clear of special tokens
    prompts = [
        {"prompt_token_ids": rng.integers(1000, 20000, args.input_len).tolist()}
        for _ in range(args.num_prompts)
    ]
    llm.generate("Warm-up:", SamplingParams(max_tokens=4))  # first-call costs out of the timing
    started = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(max_tokens=args.output_len, ignore_eos=True))
    seconds = time.perf_counter() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "output_tok_s": generated / seconds,
        "total_tok_s": (generated + args.num_prompts * args.input_len) / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, args)))
        return
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
    results = {}
    for config in CONFIGS:
        print(f"{config}: running ...", flush=True)
        child = [sys.executable, __file__, *sys.argv[1:], "--child", config]
        proc = subprocess.run(child, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{config} failed (exit code {proc.returncode}):\n{proc.stderr[-3000:]}")
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        r = results[config] = json.loads(line.removeprefix("RESULT "))
        print(f"{config}: {r['output_tok_s']:.1f} output tok/s, {r['total_tok_s']:.1f} total tok/s")
    ratio = results["adakv"]["output_tok_s"] / results["stock"]["output_tok_s"]
    print(f"AdaKV / stock: {ratio:.2f}x output tokens/s (one run each; > 1 = faster with the plugin)")


if __name__ == "__main__":  # vLLM starts its engine in child processes
    main()
