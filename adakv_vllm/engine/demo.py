"""`adakv demo`: the plugin inside vLLM on the embedded model -- generations, the bits the policy
chose for the sealed pages, and the KV capacity against bf16 in the same memory.

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the demo can read the scheduler's
bit histogram; serving and benchmarks run vLLM's usual multi-process engine.
"""

from __future__ import annotations

import argparse
import os

from adakv_vllm.model_store import resolve_model
from adakv_vllm.quant.format import RecordLayout
from adakv_vllm.quant.precision import PRECISIONS, mean_code_bits

LONG_CONTEXT = (
    "The Amazon rainforest covers much of the Amazon basin of South America. The basin spans seven "
    "million square kilometres, of which five and a half million are covered by the rainforest. The "
    "region includes territory belonging to nine nations, and most of the forest lies within Brazil, "
    "followed by Peru and Colombia. The rainforest likely formed during the Eocene era, after a global "
    "reduction of tropical temperatures when the Atlantic Ocean had widened enough to provide a warm, "
    "moist climate to the basin. It has been in existence for at least fifty-five million years, and "
    "most of the region remained free of savanna-type biomes at least until the current ice age. "
    "Deforestation is the conversion of forested areas to non-forested areas; the main sources of "
    "deforestation in the Amazon are human settlement and the development of the land for cattle "
    "ranching and soy farming."
)
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    LONG_CONTEXT + "\n\nIn one sentence, the country that holds most of the Amazon rainforest is",
)


def kv_size_table(num_layers: int, num_kv_heads: int, head_size: int, group_size: int) -> list[str]:
    """Lines of a table: bytes per record and per token (K+V, all layers) at each precision."""
    layout = RecordLayout(head_size, group_size)
    bf16 = 2 * num_layers * num_kv_heads * layout.record_bytes(PRECISIONS[-1])
    lines = [f"{'bits':>4} {'record B':>9} {'token B':>9} {'vs bf16':>8}"]
    for p in PRECISIONS:
        token = 2 * num_layers * num_kv_heads * layout.record_bytes(p)
        lines.append(f"{p.bits:>4} {layout.record_bytes(p):>9} {token:>9} {bf16 / token:>7.2f}x")
    return lines


def run_demo(args: argparse.Namespace) -> int:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    options = {"kv_cache_plugin": "adakv", "target_bits": args.target_bits, "policy": args.policy}
    llm = LLM(
        resolve_model(args.model),
        enforce_eager=True,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        additional_config=options,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for out in llm.generate(list(PROMPTS), params):
        prompt = out.prompt if len(out.prompt) < 80 else out.prompt[:40] + " ... " + out.prompt[-35:]
        print(f"\n>>> {prompt!r}\n{out.outputs[0].text!r}")

    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    print(f"\nBits chosen for sealed tokens (policy {scheduler.policy_name}, target {args.target_bits}):")
    for part, hist in zip(("keys", "values"), scheduler.bits_histogram.tolist(), strict=True):
        total = max(1, sum(hist))
        print(f"  {part}:")
        for p, count in zip(PRECISIONS, hist, strict=True):
            print(f"    {p.bits:>2} bits: {count:>6} tokens {'#' * round(40 * count / total)}")
        print(f"    average {mean_code_bits(hist):.2f} code bits over {sum(hist)} sealed tokens")

    cap, page = scheduler.capacity_report(), scheduler.page_capacity()
    print(
        f"\nPages: {page['bits_per_element']:.2f} bits per element with scales and bit map, "
        f"{page['ratio']:.2f}x the tokens of bf16 per byte."
    )
    print(
        f"KV cache: {cap['tokens']:,} tokens in {cap['kv_mib']:.0f} MiB of pages + "
        f"{cap['staging_mib']:.0f} MiB of FP16 staging ({cap['staging_slots']} open blocks); "
        f"bf16 would hold {cap['bf16_tokens']:,} in the same memory -> {cap['ratio']:.2f}x the tokens "
        f"(memory saved per token: {100 * (1 - 1 / cap['ratio']):.0f}%)"
    )
    layout = scheduler.layout
    print(f"\nRecord sizes (head_size {layout.record.head_size}, group_size {layout.record.group_size}):")
    print(
        "\n".join(
            kv_size_table(
                scheduler.num_layers, layout.num_kv_heads, layout.record.head_size, layout.record.group_size
            )
        )
    )
    return 0
