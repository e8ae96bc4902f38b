"""Run one vLLM engine in this process and print a JSON report. Used by the e2e tests through a
subprocess, so every engine gets a fresh process (vLLM engines do not coexist well in one).

    python -m tests.e2e.probe '{"adakv": {...} | null, "llm": {...}, "prompts": [...],
                                "max_tokens": 64, "n": 1, "temperature": 0, "seed": null,
                                "inspect": false}'

With "inspect", the engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and the report adds,
for every sealed block, the bits the scheduler decided and the bits read back from the KV tensor.
"""

from __future__ import annotations

import json
import os
import sys


def main(spec: dict) -> dict:
    if spec.get("inspect"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    from adakv_vllm.model_store import resolve_model

    decisions: dict[int, tuple[list[int], list[int]]] = {}  # block -> (key bits, value bits)
    preemptions = []
    sampled_positions: list[list[float]] = []  # [position, entropy, probability] of sealed tokens
    if spec.get("inspect"):
        from adakv_vllm.engine.scheduler import AdaKVScheduler

        original = AdaKVScheduler._plan
        original_preempt = AdaKVScheduler._preempt_request

        def counting_preempt(self, request, *args, **kwargs):
            preemptions.append(request.request_id)
            return original_preempt(self, request, *args, **kwargs)

        AdaKVScheduler._preempt_request = counting_preempt

        def recording_plan(self, candidates):
            for c in candidates.values():
                for offset, (entropy, prob) in enumerate(c.sampled):
                    if entropy == entropy:  # known (not NaN)
                        sampled_positions.append([c.start + offset, entropy, prob])
            seal = original(self, candidates)
            rows = zip(seal.block_ids.tolist(), seal.key_bits.tolist(), seal.value_bits.tolist(), strict=True)
            for block, key_row, value_row in rows:
                decisions[block] = (key_row, value_row)
            return seal

        AdaKVScheduler._plan = recording_plan

    kwargs = dict(enforce_eager=True, max_model_len=1024, gpu_memory_utilization=0.5, seed=0)
    kwargs.update(spec.get("llm", {}))
    if spec.get("adakv") is not None:
        kwargs["additional_config"] = {"kv_cache_plugin": "adakv", **spec["adakv"]}
    llm = LLM(resolve_model(None), **kwargs)
    params = SamplingParams(
        temperature=spec.get("temperature", 0.0),
        seed=spec.get("seed"),
        max_tokens=spec.get("max_tokens", 64),
        n=spec.get("n", 1),
        ignore_eos=spec.get("ignore_eos", False),
    )
    outputs = llm.generate(spec["prompts"], params, use_tqdm=False)
    report = {
        "texts": [[c.text for c in o.outputs] for o in outputs],
        "token_ids": [[list(c.token_ids) for c in o.outputs] for o in outputs],
        "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
        "num_decisions": len(decisions),
        "block_size": llm.llm_engine.vllm_config.cache_config.block_size,
    }
    if spec.get("inspect"):
        report.update(_inspect(llm, decisions))
        report["preemptions"] = len(preemptions)
        report["sealed_with_sampler_features"] = len(sampled_positions)
        report["sampler_features"] = sampled_positions
    return report


def _inspect(llm, decisions: dict[int, list[int]]) -> dict:
    import torch

    from adakv_vllm.attention import runtime

    store = runtime.store()
    sealed = sorted(b for b in decisions if bool(store.sealed[b]))
    ids = torch.tensor(sealed, dtype=torch.int64)
    key_bits, value_bits = store.bits(ids)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    used = [store.layout.used_bytes(k, v) for k, v in zip(key_bits, value_bits, strict=True)]
    return {
        "sealed_blocks": sealed,
        "decided_key_bits": [decisions[b][0] for b in sealed],
        "decided_value_bits": [decisions[b][1] for b in sealed],
        "read_key_bits": key_bits.tolist(),
        "read_value_bits": value_bits.tolist(),
        "used_bytes": used,
        "page_bytes": store.layout.page_bytes,
        "bits_histogram": scheduler.bits_histogram.tolist(),
        "capacity": scheduler.capacity_report(),
        "page_capacity": scheduler.page_capacity(),
        "staging_peak": store.staging.peak,
    }


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    print("PROBE-RESULT " + json.dumps(result))
