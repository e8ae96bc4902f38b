"""`adakv demo`: greedy generations through vLLM, then what each precision costs per cached token."""

from __future__ import annotations

import argparse

from adakv_vllm.model_store import resolve_model
from adakv_vllm.quant.format import RecordLayout
from adakv_vllm.quant.precision import PRECISIONS

PROMPTS = (
    "The capital of France is",
    "A short poem about the sea:",
    "def fibonacci(n):",
)
DEFAULT_GROUP_SIZE = 32


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
    from vllm import LLM, SamplingParams

    llm = LLM(
        resolve_model(args.model),
        enforce_eager=True,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for out in llm.generate(list(PROMPTS), params):
        print(f"\n>>> {out.prompt!r}\n{out.outputs[0].text!r}")

    hf = llm.llm_engine.model_config.hf_config
    head_size = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    print(
        f"\nKV record sizes ({hf.num_hidden_layers} layers, {hf.num_key_value_heads} KV heads, "
        f"head_size {head_size}, group_size {DEFAULT_GROUP_SIZE}):"
    )
    print(
        "\n".join(kv_size_table(hf.num_hidden_layers, hf.num_key_value_heads, head_size, DEFAULT_GROUP_SIZE))
    )
    return 0
