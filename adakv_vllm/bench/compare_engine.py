"""Run ONE config of `adakv bench compare` for one round and write its JSON. Spawned by compare.py:
a fresh process per config and round, so a crash loses that one only.

    python -m adakv_vllm.bench.compare_engine SPEC_JSON

The engine is built as a user's `LLM(model, ...)` builds it, vLLM's own process layout included
(engine core and worker in child processes): the spec adds the config's keywords, the user's engine
arguments (the same for every config) and disable_log_stats=False, without which vLLM keeps no
per-request timestamps. The result file is rewritten after every phase, so a crash keeps the phases
already measured. Progress lines start with PROGRESS.

Phases; everything AdaKV adds (sealing, features, the scheduler's policy) runs inside the timers:
  warm-up     one short request, not measured (first-call costs)
  throughput  N random-token prompts in one generate call, ignore_eos: output and total tokens/s
  decode      per point (B, C): B prompts of C random tokens never seen before ("cold": prefilled,
              and their blocks sealed, during the call), then the same prompts again ("warm": their
              full blocks come from the prefix cache, if the engine has one). Per call: the wall time,
              and per request decode ms/token = (last_token_ts - first_token_ts) / (tokens - 1) and
              TTFT (arrival -> first token), each averaged over the B requests. In a cold call the
              requests decoding share steps with the prefill chunks of the others, as in service.
  capacity    vLLM's num blocks x block size; peak RSS of the engine's process tree (process_tree.py).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from adakv_vllm.bench.process_tree import ProcessTree

PROGRESS = "PROGRESS "
THROUGHPUT_STREAM, DECODE_STREAM, WARMUP_STREAM = 1, 2, 3  # seed streams: prompts never share prefixes


def random_prompts(vocab: np.ndarray, seed: int, stream: int, length: int, count: int) -> list[dict]:
    """`count` prompts of `length` token ids drawn uniformly from `vocab` ([V] int64), as TokensPrompts.
    Seeded by (seed, stream, length, count): two decode points never share a prompt."""
    rng = np.random.default_rng([seed, stream, length, count])
    ids = vocab[rng.integers(0, len(vocab), size=(count, length))]  # [count, length]
    return [{"prompt_token_ids": row.tolist()} for row in ids]


def progress(name: str, message: str) -> None:
    print(f"{PROGRESS}[{name}] {message}", file=sys.stderr, flush=True)


def _timed_generate(llm, tree: ProcessTree, prompts: list[dict], params) -> tuple[list, dict]:
    cpu, started = tree.cpu_seconds(), time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - started
    return outputs, {"wall_s": wall, "cpu_s": tree.cpu_seconds() - cpu}


def measure_throughput(llm, tree: ProcessTree, vocab: np.ndarray, spec: dict) -> dict:
    from vllm import SamplingParams

    cfg = spec["throughput"]
    prompts = random_prompts(vocab, spec["seed"], THROUGHPUT_STREAM, cfg["input_len"], cfg["num_prompts"])
    params = SamplingParams(temperature=0.0, max_tokens=cfg["output_len"], ignore_eos=True)
    outputs, clock = _timed_generate(llm, tree, prompts, params)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    in_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {
        **clock,
        "output_tokens": out_tokens,
        "input_tokens": in_tokens,
        "output_tok_s": out_tokens / clock["wall_s"],
        "total_tok_s": (in_tokens + out_tokens) / clock["wall_s"],
    }


def decode_figures(outputs: list, clock: dict) -> dict:
    """Per-request timestamps of one generate call -> its decode figures."""
    ms_per_token, ttft_ms, cached = [], [], []
    for o in outputs:
        m = o.metrics
        if m is None or m.num_generation_tokens < 2:
            raise RuntimeError("vLLM returned no per-request timestamps (are stats disabled?)")
        ms_per_token.append(1e3 * (m.last_token_ts - m.first_token_ts) / (m.num_generation_tokens - 1))
        ttft_ms.append(1e3 * m.first_token_latency)
        cached.append(o.num_cached_tokens or 0)
    return {
        **clock,
        "ms_per_token": float(np.mean(ms_per_token)),
        "ttft_ms": float(np.mean(ttft_ms)),
        "per_request_ms_per_token": ms_per_token,
        "per_request_ttft_ms": ttft_ms,
        "cached_prompt_tokens": float(np.mean(cached)),  # ~0 cold; most of the prompt warm
    }


def measure_decode(llm, tree: ProcessTree, vocab: np.ndarray, spec: dict, batch: int, context: int) -> dict:
    """-> {"cold": figures, "warm": figures} at one point: `batch` prompts of `context` tokens."""
    from vllm import SamplingParams

    prompts = random_prompts(vocab, spec["seed"], DECODE_STREAM, context, batch)
    params = SamplingParams(temperature=0.0, max_tokens=spec["decode"]["tokens"], ignore_eos=True)
    out = {}
    for phase in ("cold", "warm"):
        progress(spec["name"], f"decode {batch}x{context} {phase}")
        outputs, clock = _timed_generate(llm, tree, prompts, params)
        out[phase] = decode_figures(outputs, clock)
    return out


def engine_settings(vllm_config) -> dict:
    """The settings the engine resolved (its defaults plus whatever was passed)."""
    cache, sched, model = vllm_config.cache_config, vllm_config.scheduler_config, vllm_config.model_config
    mode = vllm_config.compilation_config.mode
    return {
        "block_size": cache.block_size,
        "num_blocks": cache.num_gpu_blocks,
        "kv_cache_dtype": cache.cache_dtype,
        "enable_prefix_caching": cache.enable_prefix_caching,
        "max_num_seqs": sched.max_num_seqs,
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "enable_chunked_prefill": sched.enable_chunked_prefill,
        "max_model_len": model.max_model_len,
        "enforce_eager": model.enforce_eager,
        "compilation_mode": getattr(mode, "name", str(mode)),
    }


def run(spec: dict) -> None:
    from vllm import LLM, SamplingParams

    result_path = Path(spec["output"])
    name = spec["name"]
    result: dict = {"name": name, "phases_done": []}
    tree = ProcessTree()

    def save() -> None:
        peaks = tree.peak_rss_mib()
        if peaks:  # at exit the children are gone: keep the last reading taken while they lived
            result["peak_rss_per_process_mib"] = peaks
            result["peak_rss_mib"] = sum(peaks.values())
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(result_path)

    progress(name, "starting engine")
    started = time.perf_counter()
    # disable_log_stats=False: LLM() turns stats off by default, and RequestOutput.metrics with them.
    llm = LLM(spec["model"], **spec["engine_args"], **spec["llm_kwargs"], disable_log_stats=False)
    result["startup_s"] = time.perf_counter() - started
    result["engine"] = engine_settings(llm.llm_engine.vllm_config)
    result["kv_capacity_tokens"] = result["engine"]["num_blocks"] * result["engine"]["block_size"]
    result["phases_done"].append("startup")
    save()

    tokenizer = llm.get_tokenizer()
    special = set(tokenizer.all_special_ids)
    vocab = np.array([i for i in range(llm.llm_engine.model_config.get_vocab_size()) if i not in special])
    warm_up = random_prompts(vocab, spec["seed"], WARMUP_STREAM, 64, 1)
    llm.generate(warm_up, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)

    if spec.get("throughput"):
        t = spec["throughput"]
        progress(name, f"throughput {t['num_prompts']} prompts x {t['input_len']} in / {t['output_len']} out")
        result["throughput"] = measure_throughput(llm, tree, vocab, spec)
        result["phases_done"].append("throughput")
        save()
    if spec.get("decode"):
        result["decode"] = {}
        for batch, context in spec["decode"]["points"]:
            result["decode"][f"{batch}x{context}"] = measure_decode(llm, tree, vocab, spec, batch, context)
            result["phases_done"].append(f"decode {batch}x{context}")
            save()
    result["seconds"] = time.perf_counter() - started
    save()
    progress(name, f"done in {result['seconds']:.0f} s, peak RSS {result['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
