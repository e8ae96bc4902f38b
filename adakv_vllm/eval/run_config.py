"""Run one phase ("wikitext", "mc" or "needle") of ONE config in this process and write its JSON.
Spawned by `adakv eval`: one process per engine (vLLM engines do not share a process well, and a
crash loses one phase of one config).

    python -m adakv_vllm.eval.run_config SPEC_JSON
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from adakv_vllm.quant.precision import mean_code_bits

# The same engine settings for every config (stock ones included), so differences are the cache's.
# Scored prompts are prefilled one block per request per step, so their queries read earlier blocks
# from sealed pages (tasks.py): WikiText runs one window at a time with a one-block step budget
# (vLLM lifts long_prefill_token_threshold when a single request runs); the multiple-choice tasks
# batch many requests, each capped at one block per step. The needle is scored on generated tokens,
# which read every full block of the prompt from sealed pages whatever the prefill chunking.
COMMON = dict(enforce_eager=True, max_model_len=8192, gpu_memory_utilization=0.5, seed=0)


def phase_settings(phase: str, block_size: int) -> dict:
    if phase == "wikitext":
        return dict(max_num_seqs=1, max_num_batched_tokens=block_size)
    if phase == "mc":
        return dict(max_num_seqs=16, max_num_batched_tokens=512, long_prefill_token_threshold=block_size)
    if phase == "needle":
        return dict(max_num_seqs=16, max_num_batched_tokens=1024)
    raise ValueError(f"unknown phase {phase!r}")


def run(spec: dict) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: capture logprobs, read bit stats
    from transformers import AutoTokenizer
    from vllm import LLM

    from adakv_vllm.eval import tasks
    from adakv_vllm.eval.capture import PromptLogprobCapture

    name, llm_kwargs = spec["config"], spec["llm_kwargs"]
    uses_pages = llm_kwargs["additional_config"].get("kv_cache_plugin") == "adakv"
    started = time.time()
    block_size = spec["block_size"]
    settings = phase_settings(spec["phase"], block_size)
    llm = LLM(spec["model"], **COMMON, block_size=block_size, **settings, **llm_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    capture = PromptLogprobCapture()
    results: dict = {}
    for task in spec["tasks"]:
        print(f"[{name}] {task}", file=sys.stderr, flush=True)
        reads_before = _reads(uses_pages)
        if task == "wikitext":
            windows = tasks.wikitext_windows(tokenizer, spec["wikitext_window"], spec["wikitext_limit"])
            ref_path = Path(spec["reference_path"])
            reference = torch.load(ref_path, weights_only=True) if ref_path.is_file() else None
            if reference is None and not spec["is_reference"]:
                raise RuntimeError(f"run the reference config first: {ref_path} is missing")
            # only here: the capture keeps every prompt's whole [positions, vocab] log-probabilities
            # (in an MC task of 1000 examples that grew the engine past 24 GiB)
            with capture.installed():
                out, new_reference = tasks.eval_wikitext(llm, capture, windows, reference)
            if new_reference is not None:
                ref_path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(new_reference, ref_path)
            results[task] = out
        elif task == "needle":
            results[task] = tasks.eval_needle(llm, tokenizer, spec["needle_lengths"])
        else:
            results[task] = tasks.eval_mc(llm, tokenizer, task, spec["limit"])
        results[task]["quantized_reads"] = _quantized_share(
            reads_before, _reads(uses_pages), llm_kwargs["kv_cache_dtype"]
        )
    return {
        "config": name,
        "signature": spec["signature"],
        "avg_bits": _average_bits(llm, uses_pages, spec["nominal_bits"]),
        "capacity": capacity(llm, uses_pages, spec["nominal_bits"]),
        "results": results,
        "seconds": time.time() - started,
    }


def _reads(uses_pages: bool) -> tuple[int, int]:
    if not uses_pages:
        return 0, 0
    from adakv_vllm.attention import runtime

    store = runtime.store()
    return store.sealed_reads, store.total_reads


def _quantized_share(before, after, kv_cache_dtype: str) -> float | None:
    """Share of attention token-reads served from sealed (quantized) pages during one task."""
    if before == after == (0, 0):  # stock: every read is of the cache dtype
        return 1.0 if kv_cache_dtype != "auto" else 0.0
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else 0.0


def _average_bits(llm, uses_pages: bool, nominal_bits: float) -> float:
    """Code bits actually stored per sealed element, keys and values (stock configs: their fixed
    precision). Scales and the bit map are not in it: `capacity` counts them."""
    if not uses_pages:
        return nominal_bits
    return mean_code_bits(llm.llm_engine.engine_core.engine_core.scheduler.bits_histogram.sum(0).tolist())


def capacity(llm, uses_pages: bool, nominal_bits: float) -> dict:
    """The capacity ratio (bf16 bytes per cached token / this config's bytes per cached token, the
    page's bit map and scales included) and the effective bits per element it means."""
    if not uses_pages:
        return {"ratio": 16 / nominal_bits, "bits_per_element": nominal_bits}
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    return scheduler.page_capacity()


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    result = run(spec)
    out = Path(spec["output"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out)
