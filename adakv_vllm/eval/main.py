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
import tempfile
from pathlib import Path

from adakv_vllm import envs
from adakv_vllm.eval import report
from adakv_vllm.eval.configs import DEFAULT_CONFIGS, REFERENCE, check_training_overlap, parse_configs
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
    parser.add_argument(
        "--needle-lengths", default="1024,2048,4096", help="prompt lengths in tokens (<= 8150)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("results/eval"), help="folder for JSON, table, plots"
    )
    parser.add_argument("--kv-space-gib", default="4", help="VLLM_CPU_KVCACHE_SPACE for every engine")
    parser.add_argument(
        "--block-size",
        type=int,
        default=32,
        help="KV block size for every config (stock CPU attention needs a multiple of 32)",
    )
    parser.add_argument(
        "--controller-weights", default=None, help="weights for the learned configs (adakv train-controller)"
    )
    parser.add_argument("--force", action="store_true", help="re-run configs that already have results")
    parser.add_argument(
        "--ray-address",
        default=None,
        help="run configs as Ray tasks on this cluster ('local' starts a local Ray instance)",
    )


def main(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(ALL_TASKS))
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {ALL_TASKS}")
    try:
        configs = parse_configs(args.configs, args.controller_weights)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if "wikitext" in tasks and REFERENCE not in [c.name for c in configs]:
        configs.insert(0, parse_configs(REFERENCE)[0])  # KL needs the bf16 reference distributions
    configs.sort(key=lambda c: c.name != REFERENCE)
    model = resolve_model(args.model)
    spans = []
    try:
        if "wikitext" in tasks:
            from transformers import AutoTokenizer

            from adakv_vllm.eval.tasks import wikitext_ids, wikitext_spans

            num_tokens = len(wikitext_ids(AutoTokenizer.from_pretrained(model)))
            spans = wikitext_spans(num_tokens, args.wikitext_window, args.wikitext_limit)
        check_training_overlap(configs, spans, {t: args.limit or None for t in tasks if t in MC_TASKS})
    except ValueError as e:
        raise SystemExit(str(e)) from None
    needle_lengths = [int(x) for x in args.needle_lengths.split(",")]
    settings = {
        "model": model,
        "tasks": tasks,
        "limit": args.limit,
        "wikitext_limit": args.wikitext_limit,
        "wikitext_window": args.wikitext_window,
        "needle_lengths": needle_lengths,
        "block_size": args.block_size,
    }
    signature = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    args.out.mkdir(parents=True, exist_ok=True)
    mc = [t for t in tasks if t in MC_TASKS]
    phases = [
        (name, ts)
        for name, ts in (
            ("wikitext", ["wikitext"] if "wikitext" in tasks else []),
            ("mc", mc),
            ("needle", ["needle"] if "needle" in tasks else []),
        )
        if ts
    ]
    todo = []
    for config in configs:
        path = args.out / f"{config.name}.json"
        if not args.force and path.is_file() and json.loads(path.read_text()).get("signature") == signature:
            print(f"{config.name}: reusing {path}", file=sys.stderr)
        else:
            todo.append(config)
    reference_path = args.out / f"reference-wikitext-{signature}.pt"
    job = dict(phases=phases, settings=settings, signature=signature, kv_space=args.kv_space_gib)
    # The bf16 reference runs first: every other config's KL needs its distributions.
    first = [c for c in todo if c.name == REFERENCE]
    rest = [c for c in todo if c.name != REFERENCE]
    if args.ray_address:
        _run_with_ray(args.ray_address, first, rest, job, reference_path, args.out)
    else:
        for i, config in enumerate(first + rest, 1):
            print(f"[{i}/{len(todo)}] {config.name}", file=sys.stderr, flush=True)
            merged, ref = run_config(config, reference=_read(reference_path), **job)
            _store(args.out, merged, ref, reference_path)
    results = [json.loads((args.out / f"{c.name}.json").read_text()) for c in configs]
    table = report.markdown(results, settings)
    (args.out / "results.md").write_text(table)
    report.plots(results, args.out)
    print(table)
    return 0


def run_config(config, phases, settings, signature, kv_space, reference):
    """Run every phase of one config, each in its own engine process, in a private temp folder, so
    it can run on any machine (a Ray worker included). reference: bytes of the bf16 WikiText
    reference or None. -> (merged result dict, reference bytes this run produced or None)."""
    name = config.name
    with tempfile.TemporaryDirectory() as tmp:
        reference_path = Path(tmp) / "reference.pt"
        if reference is not None:
            reference_path.write_bytes(reference)
        merged: dict = {"config": name, "signature": signature, "results": {}, "seconds": 0.0}
        for phase, phase_tasks in phases:
            print(f"  {name}: {phase} ({', '.join(phase_tasks)})", file=sys.stderr, flush=True)
            part = Path(tmp) / f"{phase}.json"
            spec = {
                **settings,
                "tasks": phase_tasks,
                "phase": phase,
                "config": name,
                "llm_kwargs": config.llm_kwargs(),
                "nominal_bits": config.nominal_bits,
                "signature": signature,
                "output": str(part),
                "reference_path": str(reference_path),
                "is_reference": name == REFERENCE,
            }
            env = {**envs.without_plugin_switch(os.environ), "VLLM_CPU_KVCACHE_SPACE": kv_space}
            cmd = [sys.executable, "-m", "adakv_vllm.eval.run_config", json.dumps(spec)]
            if subprocess.run(cmd, env=env).returncode != 0:
                raise RuntimeError(f"config {name} ({phase}) failed; finished configs are kept")
            result = json.loads(part.read_text())
            merged["results"].update(result["results"])
            merged["seconds"] += result["seconds"]
            merged.setdefault("avg_bits_by_phase", {})[phase] = result["avg_bits"]
            merged["capacity"] = result["capacity"]
        merged["avg_bits"] = _mean_bits(merged["avg_bits_by_phase"])
        produced = reference_path.read_bytes() if reference is None and reference_path.is_file() else None
        return merged, produced


def _run_with_ray(address, first, rest, job, reference_path, out) -> None:
    """Each config is one Ray task with its own engines; tasks ask for every CPU of a node (vLLM
    engines must not share cores), so a cluster runs as many configs at once as it has nodes."""
    import ray

    ray.init(address=None if address == "local" else address, ignore_reinit_error=True)
    cpus = int(min(node["Resources"].get("CPU", 1) for node in ray.nodes() if node["Alive"]))
    remote = ray.remote(num_cpus=cpus)(run_config)
    for group in (first, rest):
        refs = [remote.remote(c, reference=_read(reference_path), **job) for c in group]
        for merged, ref in ray.get(refs):
            _store(out, merged, ref, reference_path)
            print(f"{merged['config']}: done on Ray", file=sys.stderr, flush=True)


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _store(out: Path, merged: dict, reference: bytes | None, reference_path: Path) -> None:
    if reference is not None:
        reference_path.write_bytes(reference)
    (out / f"{merged['config']}.json").write_text(json.dumps(merged))


def _mean_bits(by_phase: dict[str, float]) -> float:
    values = [v for v in by_phase.values() if v == v]  # drop NaN (a phase that sealed nothing)
    return sum(values) / len(values) if values else float("nan")
