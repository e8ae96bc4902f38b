"""KV capacity and greedy agreement: stock bf16 vs AdaKV at several target bits, one run each.

Every engine gets the same VLLM_CPU_KVCACHE_SPACE and scheduler limits; capacity is what vLLM
itself reports (num_gpu_blocks x block_size), so AdaKV's FP16 staging reserve is already paid for.
Agreement is the share of greedy tokens equal to stock bf16 up to the first divergence (8 prompts x
64 tokens) -- a smoke signal, not a quality benchmark (see the evaluation suite for that).

    python benchmarks/capacity.py [--targets 8 4 3 2.5 2] [--policy rule] [--kv-space-gib 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.conftest import PROMPTS, run_probe  # noqa: E402

LLM_ARGS = {"max_num_seqs": 8, "max_num_batched_tokens": 512}


def run(adakv: dict | None, kv_space: str) -> dict:
    spec = {"adakv": adakv, "llm": LLM_ARGS, "prompts": PROMPTS, "max_tokens": 64}
    return run_probe(spec, env={"VLLM_CPU_KVCACHE_SPACE": kv_space})


def agreement(a: dict, b: dict) -> float:
    same = total = 0
    for x, y in zip(a["token_ids"], b["token_ids"], strict=True):
        n = next((i for i, (u, v) in enumerate(zip(x[0], y[0], strict=False)) if u != v), len(x[0]))
        same, total = same + n, total + len(x[0])
    return same / total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--targets", type=float, nargs="+", default=[16, 8, 4, 3, 2.5, 2])
    parser.add_argument("--policy", default="rule")
    parser.add_argument("--kv-space-gib", default="2")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    rows = []
    print(f"[1/{len(args.targets) + 1}] stock bf16", file=sys.stderr, flush=True)
    stock = run(None, args.kv_space_gib)
    stock_tokens = stock["num_gpu_blocks"] * stock["block_size"]
    rows.append({"config": "stock bf16", "tokens": stock_tokens, "ratio": 1.0, "agreement": 1.0})
    for i, target in enumerate(args.targets, 2):
        print(
            f"[{i}/{len(args.targets) + 1}] adakv {args.policy} @ {target} bits", file=sys.stderr, flush=True
        )
        report = run({"target_bits": target, "policy": args.policy}, args.kv_space_gib)
        tokens = report["num_gpu_blocks"] * report["block_size"]
        rows.append(
            {
                "config": f"adakv {args.policy} {target:g} bits",
                "tokens": tokens,
                "ratio": tokens / stock_tokens,
                "agreement": agreement(report, stock),
            }
        )
    print(f"\nKV capacity at VLLM_CPU_KVCACHE_SPACE={args.kv_space_gib} GiB (SmolLM2-135M):\n")
    print("| config | KV tokens | vs bf16 | greedy agreement |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['tokens']:,} | {r['ratio']:.2f}x | {100 * r['agreement']:.0f}% |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
