"""Run ONE config of `adakv bench compare` in this process and write its JSON. Spawned by compare.py:
one fresh process per engine, so ru_maxrss is this engine's peak and a crash loses one config only.

    python -m adakv_vllm.bench.compare_engine SPEC_JSON

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the parent). The result file
is rewritten after every phase, so a crash keeps the phases already measured. Progress lines start
with PROGRESS so the parent can show them and keep vLLM's own log quiet.

Decode ms/token excludes prefill: the context prompts are prefilled once (max_tokens=1, their full
blocks stay in the prefix cache), then each batch re-runs them; the re-run's first step only
recomputes the last block of every prompt, so all requests of a batch get their first token in the
same step, and vLLM's per-request timestamps give (last_token_ts - first_token_ts) / (tokens - 1)
= the time of one decode step at that batch size and context. Beside it, a clock on the engine's
steps gives the median wall time and the mean process-CPU time of those decode steps.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

PROGRESS = "PROGRESS "
THROUGHPUT_STREAM, DECODE_STREAM, WARMUP_STREAM = 1, 2, 3  # seed streams: prompts never share prefixes


def random_prompts(vocab: np.ndarray, seed: int, stream: int, length: int, count: int) -> list[dict]:
    """`count` prompts of `length` token ids drawn uniformly from `vocab` ([V] int64), as TokensPrompts."""
    rng = np.random.default_rng([seed, stream, length])
    ids = vocab[rng.integers(0, len(vocab), size=(count, length))]  # [count, length]
    return [{"prompt_token_ids": row.tolist()} for row in ids]


class StepClock:
    """Wall and process-CPU time of every engine step that produced tokens (the engine runs in this
    process; the hook is the output processor, which sees each step's new tokens). The median
    wall time shrugs off a few disturbed steps; CPU time shows how many cores a step keeps busy, and
    rises too when other work makes OpenMP threads spin-wait for a descheduled peer."""

    def __init__(self, engine):
        self.marks: list[tuple[float, float]] = []  # (perf_counter, process_time) per step with tokens
        process = engine.output_processor.process_outputs

        def timed_process(engine_core_outputs, *args, **kwargs):
            if any(o.new_token_ids for o in engine_core_outputs):
                self.marks.append((time.perf_counter(), time.process_time()))
            return process(engine_core_outputs, *args, **kwargs)

        engine.output_processor.process_outputs = timed_process

    def decode_steps(self) -> dict:
        """Figures of the steps after the first productive one (the first token) since the last reset."""
        wall = np.diff([m[0] for m in self.marks]) * 1e3
        cpu = np.diff([m[1] for m in self.marks]) * 1e3
        return {
            "steps": len(wall),
            "step_wall_ms_median": float(np.median(wall)),
            "step_cpu_ms_mean": float(cpu.mean()),
        }


def progress(name: str, message: str) -> None:
    print(f"{PROGRESS}[{name}] {message}", file=sys.stderr, flush=True)


def measure_throughput(llm, vocab, spec: dict) -> dict:
    from vllm import SamplingParams

    cfg = spec["throughput"]
    prompts = random_prompts(vocab, spec["seed"], THROUGHPUT_STREAM, cfg["input_len"], cfg["num_prompts"])
    params = SamplingParams(temperature=0.0, max_tokens=cfg["output_len"], ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    in_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {
        "seconds": elapsed,
        "output_tokens": out_tokens,
        "input_tokens": in_tokens,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (in_tokens + out_tokens) / elapsed,
    }


def measure_decode(
    llm, clock: StepClock, vocab, spec: dict, context: int, batch_sizes: list[int]
) -> dict[str, dict]:
    """-> {str(batch): figures} for one context length."""
    from vllm import SamplingParams

    cfg = spec["decode"]
    prompts = random_prompts(vocab, spec["seed"], DECODE_STREAM, context, max(batch_sizes))
    started = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    prefill_s = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=cfg["tokens"], ignore_eos=True)
    out = {}
    for batch in sorted(batch_sizes, reverse=True):
        progress(spec["name"], f"decode context {context} batch {batch}")
        clock.marks.clear()
        outputs = llm.generate(prompts[:batch], params, use_tqdm=False)
        per_request, firsts = [], []
        for o in outputs:
            m = o.metrics
            if m is None or m.num_generation_tokens < 2:
                raise RuntimeError("vLLM returned no per-request timestamps (are stats disabled?)")
            per_request.append(1e3 * (m.last_token_ts - m.first_token_ts) / (m.num_generation_tokens - 1))
            firsts.append(m.first_token_ts)
        ms = float(np.mean(per_request))
        out[str(batch)] = {
            "ms_per_token": ms,  # one decode step for the whole batch
            "tokens_per_s": 1e3 * batch / ms,
            "per_request_ms": per_request,
            "first_token_spread_ms": 1e3 * (max(firsts) - min(firsts)),  # ~0: every request decoded
            "cached_prompt_tokens": float(np.mean([o.num_cached_tokens or 0 for o in outputs])),
            "prefill_seconds_all_prompts": prefill_s,
            **clock.decode_steps(),
        }
    return out


def run(spec: dict) -> None:
    from vllm import LLM, SamplingParams

    result_path = Path(spec["output"])
    result: dict = {"name": spec["name"], "phases_done": []}

    def save() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
        # CPU seconds of this process: far below cores x wall when other work shared the machine
        result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(result_path)

    name = spec["name"]
    progress(name, "starting engine")
    started = time.perf_counter()
    # disable_log_stats=False: LLM() turns stats off by default, and RequestOutput.metrics with them.
    llm = LLM(spec["model"], **spec["engine"], **spec["llm_kwargs"], disable_log_stats=False)
    cache = llm.llm_engine.vllm_config.cache_config
    result["startup_seconds"] = time.perf_counter() - started
    result["num_blocks"] = cache.num_gpu_blocks
    result["block_size"] = cache.block_size
    result["kv_capacity_tokens"] = cache.num_gpu_blocks * cache.block_size
    result["phases_done"].append("startup")
    save()

    clock = StepClock(llm.llm_engine)
    tokenizer = llm.get_tokenizer()
    special = set(tokenizer.all_special_ids)
    vocab = np.array([i for i in range(llm.llm_engine.model_config.get_vocab_size()) if i not in special])
    warm = random_prompts(vocab, spec["seed"], WARMUP_STREAM, 64, 1)  # first-call costs out of the figures
    llm.generate(warm, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)

    if spec.get("throughput"):
        t = spec["throughput"]
        progress(name, f"throughput {t['num_prompts']} prompts x {t['input_len']} in / {t['output_len']} out")
        result["throughput"] = measure_throughput(llm, vocab, spec)
        result["phases_done"].append("throughput")
        save()
    if spec.get("decode"):
        result["decode"] = {}
        for context in spec["decode"]["contexts"]:
            skip = {tuple(point) for point in spec["decode"]["skip"]}  # {(batch, context)}
            batches = [b for b in spec["decode"]["batch_sizes"] if (b, context) not in skip]
            if batches:
                progress(name, f"decode context {context}: prefill {max(batches)} prompts")
                result["decode"][str(context)] = measure_decode(llm, clock, vocab, spec, context, batches)
            result["phases_done"].append(f"decode {context}")
            save()
    result["seconds"] = time.perf_counter() - started
    save()
    progress(name, f"done in {result['seconds']:.0f} s, peak RSS {result['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
