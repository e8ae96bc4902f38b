"""`adakv eval`: run configs (one engine process each), reuse finished ones, write JSON, a markdown
table with paired differences against bf16, and PNG plots of quality against average bits.

    adakv eval --tasks wikitext,hellaswag,arc_easy --configs bf16,static4,random3,rule3 --limit 200
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from adakv_vllm.eval import report
from adakv_vllm.eval.configs import DEFAULT_CONFIGS, REFERENCE, parse_configs
from adakv_vllm.eval.data import MC_TASKS
from adakv_vllm.model_store import resolve_model

ALL_TASKS = ("wikitext", *MC_TASKS, "needle")
DEFAULT_TASKS = ("wikitext", "hellaswag", "arc_easy", "piqa", "winogrande", "openbookqa", "boolq")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="hub id or folder (default: the embedded SmolLM2)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma list from {ALL_TASKS}")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma list (see configs.py)")
    parser.add_argument("--limit", type=int, default=200, help="examples per multiple-choice task")
    parser.add_argument("--wikitext-limit", type=int, default=32, help="WikiText-2 windows")
    parser.add_argument(
        "--wikitext-window", type=int, default=512, help="tokens per window (2nd half scored)"
    )
    parser.add_argument("--needle-lengths", default="1024,2048,4096,8000", help="prompt lengths in tokens")
    parser.add_argument(
        "--out", type=Path, default=Path("results/eval"), help="folder for JSON, table, plots"
    )
    parser.add_argument("--kv-space-gib", default="4", help="VLLM_CPU_KVCACHE_SPACE for every engine")
    parser.add_argument("--force", action="store_true", help="re-run configs that already have results")


def main(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(ALL_TASKS))
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {ALL_TASKS}")
    configs = parse_configs(args.configs)
    if "wikitext" in tasks and REFERENCE not in [c.name for c in configs]:
        configs.insert(0, parse_configs(REFERENCE)[0])  # KL needs the bf16 reference distributions
    configs.sort(key=lambda c: c.name != REFERENCE)
    model = resolve_model(args.model)
    needle_lengths = [int(x) for x in args.needle_lengths.split(",")]
    settings = {
        "model": model,
        "tasks": tasks,
        "limit": args.limit,
        "wikitext_limit": args.wikitext_limit,
        "wikitext_window": args.wikitext_window,
        "needle_lengths": needle_lengths,
    }
    signature = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    args.out.mkdir(parents=True, exist_ok=True)
    reference_path = args.out / f"reference-wikitext-{signature}.pt"
    for i, config in enumerate(configs, 1):
        path = args.out / f"{config.name}.json"
        if not args.force and path.is_file() and json.loads(path.read_text()).get("signature") == signature:
            print(f"[{i}/{len(configs)}] {config.name}: reusing {path}", file=sys.stderr)
            continue
        print(f"[{i}/{len(configs)}] {config.name}: running", file=sys.stderr, flush=True)
        spec = {
            **settings,
            "config": config.name,
            "signature": signature,
            "output": str(path),
            "reference_path": str(reference_path),
            "is_reference": config.name == REFERENCE,
        }
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": args.kv_space_gib}
        proc = subprocess.run([sys.executable, "-m", "adakv_vllm.eval.run_config", json.dumps(spec)], env=env)
        if proc.returncode != 0:
            raise SystemExit(
                f"config {config.name} failed (exit {proc.returncode}); finished configs are kept"
            )
    results = [json.loads((args.out / f"{c.name}.json").read_text()) for c in configs]
    table = report.markdown(results, settings)
    (args.out / "results.md").write_text(table)
    report.plots(results, args.out)
    print(table)
    return 0
