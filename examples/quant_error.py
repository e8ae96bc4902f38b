"""Relative reconstruction error of real SmolLM2 keys and values at each precision of the store.

Runs the embedded model (transformers, bf16) over WikiText-2 test text, takes the post-RoPE keys and
the values of every layer (what vLLM caches), and prints ||x - x^|| / ||x|| with:
  store-gG    the store's quantizer (quant/reference.py: Hadamard rotation, Lloyd-Max codebook, one
              fp16 scale per group of G chosen by squared error), with the bits per element it costs
  minmax-gG   the textbook baseline: per-token asymmetric round-to-nearest with an fp16 scale and
              min per group of G, no rotation (b + 32/G bits per element)
Usage: python examples/quant_error.py [--tokens 1024] [--data ../shared/data/wikitext2/wiki.test.raw]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from adakv_vllm.model_store import resolve_model
from adakv_vllm.quant.precision import Precision
from adakv_vllm.quant.reference import stored_kv

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/wikitext2/wiki.test.raw"
QUANTIZED = (Precision.INT2, Precision.INT3, Precision.INT4, Precision.INT8)


def collect_kv(model_dir: str, text: str, num_tokens: int):
    """-> keys, values: [num_layers, num_kv_heads, num_tokens, head_size] bf16 (post-RoPE keys)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    ids = tok(text, return_tensors="pt").input_ids[:, :num_tokens]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    return torch.stack([layer.keys[0] for layer in cache.layers]), torch.stack(
        [layer.values[0] for layer in cache.layers]
    )


def minmax(x: torch.Tensor, p: Precision, group: int) -> torch.Tensor:
    """Per-token asymmetric RTN, fp16 scale and min per group (the baseline): x [..., D] -> fp32."""
    g = x.float().reshape(-1, x.shape[-1] // group, group)
    low = g.amin(-1, keepdim=True).half().float()
    scale = ((g.amax(-1, keepdim=True) - low) / (2**p.bits - 1)).half().float().clamp_min(1e-8)
    return (torch.round((g - low) / scale).clamp(0, 2**p.bits - 1) * scale + low).reshape(x.shape)


def rel_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x.float() - x_hat).norm() / x.float().norm())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="hub id or folder (default: the embedded SmolLM2)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"WikiText-2 not found at {args.data}; pass --data")
    text = args.data.read_text(encoding="utf-8")[:200_000]
    keys, values = collect_kv(resolve_model(args.model), text, args.tokens)
    layers, heads, tokens, head_size = keys.shape
    print(f"{layers} layers x {heads} KV heads x {tokens} tokens, head_size {head_size}")
    print(
        f"{'method':<12}"
        + "".join(f"{'K@' + str(p.bits):>8}{'V@' + str(p.bits):>8}{'b/el':>6}" for p in QUANTIZED)
    )
    for group in (32, 64):
        for name, fn, params in (("store", stored_kv, 1), ("minmax", minmax, 2)):
            row = f"{name}-g{group:<5}"
            for p in QUANTIZED:
                errors = (rel_error(x, fn(x, p, group)) for x in (keys, values))
                row += "".join(f"{e:>8.4f}" for e in errors)
                row += f"{p.bits + 16 * params / group:>6.2f}"
            print(row)


if __name__ == "__main__":
    main()
