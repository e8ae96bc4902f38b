"""KV capacity at the user's settings: stock bf16 vs AdaKV, each engine as a user would start it.

Settings: `llm` = vLLM's defaults for the LLM class (nothing set but the KV memory), `server` = the
scheduler limits of `vllm serve` on CPU (max_num_seqs 128, max_num_batched_tokens 2048). For each
VLLM_CPU_KVCACHE_SPACE, each setting runs stock and AdaKV at its defaults (and at other target bits
if asked); capacity is what vLLM itself allocates (num_gpu_blocks x block_size), so AdaKV's FP16
staging reserve is already paid for out of the same memory.

    python benchmarks/capacity.py [--kv-space-gib 1 4] [--targets default 3 2.75] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.conftest import run_probe  # noqa: E402

SETTINGS = {
    "llm": {},
    "server": {"max_num_seqs": 128, "max_num_batched_tokens": 2048},
}
# the probe's own defaults, undone where they would change what a user gets
PROBE_OVERRIDES = {"max_model_len": 8192}


def run(adakv: dict | None, kv_space: str, setting: dict) -> dict:
    spec = {
        "adakv": adakv,
        "llm": {**PROBE_OVERRIDES, **setting},
        "prompts": ["The capital of France is"],
        "max_tokens": 4,
        "inspect": adakv is not None,
    }
    return run_probe(spec, env={"VLLM_CPU_KVCACHE_SPACE": kv_space})


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kv-space-gib", nargs="+", default=["1", "4"])
    parser.add_argument("--targets", nargs="+", default=["default"], help="'default' or target bits")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    lines = [
        "| setting | KV GiB | config | KV tokens | vs stock | staging MiB | page bits/elem |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for space in args.kv_space_gib:
        for name in args.settings:
            setting = SETTINGS[name]
            print(f"[capacity] {name} @ {space} GiB: stock", file=sys.stderr, flush=True)
            stock = run(None, space, setting)
            stock_tokens = stock["num_gpu_blocks"] * stock["block_size"]
            lines.append(f"| {name} | {space} | stock bf16 | {stock_tokens:,} | 1.00x | - | 16.00 |")
            rows.append({"setting": name, "kv_space_gib": space, "config": "stock", "tokens": stock_tokens})
            for target in args.targets:
                options = {} if target == "default" else {"target_bits": float(target)}
                label = "adakv" + ("" if target == "default" else f" {target} bits")
                print(f"[capacity] {name} @ {space} GiB: {label}", file=sys.stderr, flush=True)
                report = run(options, space, setting)
                tokens = report["num_gpu_blocks"] * report["block_size"]
                cap = report["capacity"]
                row = {
                    "setting": name,
                    "kv_space_gib": space,
                    "config": label,
                    "tokens": tokens,
                    "ratio": tokens / stock_tokens,
                    "staging_mib": cap["staging_mib"],
                    "staging_slots": cap["staging_slots"],
                    "page_bits_per_element": report["page_capacity"]["bits_per_element"],
                }
                rows.append(row)
                lines.append(
                    f"| {name} | {space} | {label} | {tokens:,} | {row['ratio']:.2f}x | "
                    f"{row['staging_mib']:.0f} ({row['staging_slots']} slots) | "
                    f"{row['page_bits_per_element']:.2f} |"
                )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
