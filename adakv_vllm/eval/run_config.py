"""Run every requested task for ONE config in this process, write its JSON. Spawned by `adakv eval`
(one process per engine: vLLM engines do not share a process well, and a crash loses one config).

    python -m adakv_vllm.eval.run_config SPEC_JSON
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from adakv_vllm.eval.configs import CONFIGS
from adakv_vllm.quant.precision import PRECISIONS

# The same engine settings for every config (stock ones included), so differences are the cache's.
BLOCK_SIZE = 32
ENGINE_SETTINGS = dict(
    enforce_eager=True,
    max_model_len=8192,
    gpu_memory_utilization=0.5,
    block_size=BLOCK_SIZE,
    long_prefill_token_threshold=BLOCK_SIZE,  # one block per request per step: see tasks.py
    max_num_seqs=16,
    max_num_batched_tokens=512,
    seed=0,
)


def run(spec: dict) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: capture logprobs, read bit stats
    from transformers import AutoTokenizer
    from vllm import LLM

    from adakv_vllm.eval import tasks
    from adakv_vllm.eval.capture import PromptLogprobCapture

    config = CONFIGS[spec["config"]]
    started = time.time()
    llm = LLM(spec["model"], **ENGINE_SETTINGS, **config.llm_kwargs())
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    uses_pages = config.adakv is not None
    capture = PromptLogprobCapture()
    results: dict = {}
    with capture.installed():
        for task in spec["tasks"]:
            print(f"[{config.name}] {task}", file=sys.stderr, flush=True)
            if task == "wikitext":
                windows = tasks.wikitext_windows(tokenizer, spec["wikitext_window"], spec["wikitext_limit"])
                ref_path = Path(spec["reference_path"])
                reference = torch.load(ref_path) if ref_path.is_file() else None
                if reference is None and not spec["is_reference"]:
                    raise RuntimeError(f"run the reference config first: {ref_path} is missing")
                out, new_reference = tasks.eval_wikitext(
                    llm, capture, windows, reference, BLOCK_SIZE, uses_pages
                )
                if new_reference is not None:
                    ref_path.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(new_reference, ref_path)
                results[task] = out
            elif task == "needle":
                results[task] = tasks.eval_needle(llm, tokenizer, spec["needle_lengths"])
            else:
                results[task] = tasks.eval_mc(llm, tokenizer, task, spec["limit"], BLOCK_SIZE, uses_pages)
    return {
        "config": config.name,
        "signature": spec["signature"],
        "avg_bits": _average_bits(llm, config),
        "results": results,
        "seconds": time.time() - started,
    }


def _average_bits(llm, config) -> float:
    """Bits actually stored per sealed element (stock configs: their fixed precision)."""
    if config.adakv is None:
        return config.nominal_bits
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    hist = scheduler.bits_histogram.tolist()
    total = sum(hist)
    return sum(p.bits * c for p, c in zip(PRECISIONS, hist, strict=True)) / total if total else float("nan")


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    result = run(spec)
    out = Path(spec["output"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out)
