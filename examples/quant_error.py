"""Relative reconstruction error of real SmolLM2 keys and values, per precision and quantizer option.

Runs the embedded model (transformers, bf16) over WikiText-2 test text, takes the post-RoPE keys and
the values of every layer (what vLLM caches), and prints ||x - x^|| / ||x|| for each precision with:
  token-gG      per-token asymmetric RTN, groups of G channels (the record format's quantizer)
  rot-token-gG  the same after the fixed Hadamard rotation (keys: q is rotated alike at read time;
                values: the attention output is rotated back)
  channel-pP    per-channel keys: each channel quantized over the P tokens of a page (KIVI-like)
Usage: python examples/quant_error.py [--tokens 1024] [--data ../shared/data/wikitext2/wiki.test.raw]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from adakv_vllm.model_store import resolve_model
from adakv_vllm.quant.precision import Precision
from adakv_vllm.quant.reference import fake_quantize, fake_quantize_channels
from adakv_vllm.quant.rotation import rotate

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/wikitext2/wiki.test.raw"
QUANTIZED = (Precision.INT2, Precision.INT4, Precision.INT8)


def collect_kv(model_dir: str, text: str, num_tokens: int):
    """-> keys, values: [num_layers, num_kv_heads, num_tokens, head_size] fp32 (post-RoPE keys)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    ids = tok(text, return_tensors="pt").input_ids[:, :num_tokens]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    keys = torch.stack([layer.keys[0] for layer in cache.layers]).float()
    values = torch.stack([layer.values[0] for layer in cache.layers]).float()
    return keys, values


def rel_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x - x_hat).norm() / x.norm())


def per_head(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply fn to each [num_tokens, head_size] slice of x: [L, H, T, D]."""
    return torch.stack([torch.stack([fn(h) for h in layer]) for layer in x])


def methods(page: int):
    for g in (16, 32, 64):
        yield f"token-g{g}", lambda x, p, g=g: fake_quantize(x, p, g), False
    for g in (16, 32):
        yield f"rot-token-g{g}", lambda x, p, g=g: fake_quantize(x, p, g), True
    yield f"channel-p{page}", lambda x, p: per_head(lambda h: fake_quantize_channels(h, p, page), x), False


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="hub id or folder (default: the embedded SmolLM2)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--tokens", type=int, default=1024, help="multiple of --page")
    parser.add_argument("--page", type=int, default=128, help="tokens per page for per-channel keys")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"WikiText-2 not found at {args.data}; pass --data")
    if args.tokens % args.page:
        raise SystemExit("--tokens must be a multiple of --page")

    text = args.data.read_text(encoding="utf-8")[:200_000]
    keys, values = collect_kv(resolve_model(args.model), text, args.tokens)
    layers, heads, tokens, head_size = keys.shape
    print(f"{layers} layers x {heads} KV heads x {tokens} tokens, head_size {head_size}")
    print(f"{'method':<16}" + "".join(f"{'K@' + str(p.bits):>9}{'V@' + str(p.bits):>9}" for p in QUANTIZED))
    for name, fn, rotated in methods(args.page):
        row = f"{name:<16}"
        k, v = (rotate(keys), rotate(values)) if rotated else (keys, values)
        for p in QUANTIZED:
            row += f"{rel_error(k, fn(k, p)):>9.4f}"
            row += f"{rel_error(v, fn(v, p)):>9.4f}" if not name.startswith("channel") else f"{'-':>9}"
        print(row)


if __name__ == "__main__":
    main()
