"""Side by side against stock vLLM: throughput, decode ms/token, KV capacity and peak RSS.

    adakv bench compare [--configs bf16,fp8,adakv8,adakv4,adakv3,adakv2.5] [--policy auto]
        [--contexts 1024,4096,8128] [--batch-sizes 1,16] [--skip 16x8128] [--json F] [--plot F.png]
    python benchmarks/compare.py ...    (the same, from a source tree)

Configs: `bf16` and `fp8` are stock vLLM (`kv_cache_dtype` auto / fp8), `adakvN` is the plugin at
target_bits N with `--policy`; every name of adakv_vllm/eval/configs.py (static4, rule3, ...) works
too. Each config runs in its own fresh process (compare_engine.py), one at a time, with
the same engine settings (ENGINE below, block_size 32 for stock too, so only the cache differs) and
the same VLLM_CPU_KVCACHE_SPACE. The default 4 GiB holds 16 x 8192 bf16 tokens (2.8 GiB) plus
AdaKV's FP16 staging reserve (~0.2 GiB at the default scheduler limits).

Measured per config:
  - throughput: random-token prompts (the same for every config: fixed seed), ignore_eos, output and
    total tokens/s of one `generate` call;
  - decode ms/token at each batch size x context (prompt length), prefill excluded (see
    compare_engine.py); ms/token is the time of one decode step of the whole batch;
  - KV capacity in tokens (vLLM's num blocks x block_size) and the process's peak RSS.
Ratios are against bf16 (x > 1: more capacity / faster throughput / SLOWER decode). A config that
crashes is recorded with its error and the others still run; the exit code is then 1.
Attention runs through whatever the plugin selects; ADAKV_CPU_ATTENTION is recorded, not set.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from adakv_vllm import envs
from adakv_vllm.config import POLICIES, AdaKVConfig
from adakv_vllm.eval.configs import CONFIGS, EvalConfig
from adakv_vllm.model_store import resolve_model

PACKAGE = Path(__file__).resolve().parents[1]  # the adakv_vllm folder this process imports
# `-m` with cwd=PACKAGE.parent: the engine process imports the same adakv_vllm as this one.
ENGINE_COMMAND = (sys.executable, "-m", "adakv_vllm.bench.compare_engine")
REFERENCE = "bf16"
DEFAULT_CONFIGS = "bf16,fp8,adakv8,adakv4,adakv3,adakv2.5"
ADAKV_NAME = re.compile(r"adakv(\d+(?:\.\d+)?)")
BLOCK_SIZE = 32  # stock CPU attention needs a multiple of 32; AdaKV's page is one 32-token block
PROGRESS = "PROGRESS "  # compare_engine.py's progress lines


def resolve_config(name: str, policy: str) -> EvalConfig:
    """A config by name: bf16 | fp8 | adakvN (target_bits N, `policy`) | a name of eval/configs.py."""
    if name in CONFIGS:
        return CONFIGS[name]
    match = ADAKV_NAME.fullmatch(name)
    if match is None:
        raise ValueError(
            f"unknown config {name!r}; choose adakvN (e.g. adakv4, adakv2.5) or {sorted(CONFIGS)}"
        )
    options = {"target_bits": float(match.group(1)), "policy": policy}
    AdaKVConfig.from_options(options)  # ValueError naming the allowed values, before any engine starts
    return EvalConfig(name, options, nominal_bits=options["target_bits"])


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _skip(text: str) -> list[tuple[int, int]]:
    points = []
    for item in [x.strip() for x in text.split(",") if x.strip()]:
        batch, sep, context = item.partition("x")
        if not sep or not batch.isdigit() or not context.isdigit():
            raise ValueError(f"--skip takes BATCHxCONTEXT items, e.g. 16x8128; got {item!r}")
        points.append((int(batch), int(context)))
    return points


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adakv bench compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma list (default: %(default)s)")
    p.add_argument(
        "--policy",
        default="auto",
        choices=POLICIES,
        help="policy of the adakvN configs (default: the plugin's default, %(default)s)",
    )
    p.add_argument("--model", default=None, help="hub id or folder (default: the embedded SmolLM2)")
    p.add_argument("--num-prompts", type=int, default=64, help="throughput prompts")
    p.add_argument("--input-len", type=int, default=512, help="throughput prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="throughput generated tokens")
    p.add_argument("--contexts", default="1024,4096,8128", help="decode prompt lengths (tokens)")
    p.add_argument("--batch-sizes", default="1,16", help="decode batch sizes")
    p.add_argument("--decode-tokens", type=int, default=64, help="generated tokens per decode request")
    p.add_argument("--skip", default="", help="decode points to leave out, BATCHxCONTEXT list: 16x8128")
    p.add_argument("--no-throughput", action="store_true", help="decode and capacity only")
    p.add_argument("--no-decode", action="store_true", help="throughput and capacity only")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096, help="vLLM's CPU default")
    p.add_argument("--kv-space-gib", default="4", help="VLLM_CPU_KVCACHE_SPACE for every config")
    p.add_argument("--seed", type=int, default=0, help="prompt and engine seed")
    p.add_argument("--timeout", type=float, default=None, help="seconds per config before it is killed")
    p.add_argument("--json", type=Path, default=None, help="write everything here")
    p.add_argument("--plot", type=Path, default=None, help="PNG of decode ms/token against context")
    p.add_argument("--verbose", action="store_true", help="show vLLM's own log of every engine")
    return p


def make_settings(args: argparse.Namespace) -> dict:
    """Validated benchmark settings (ValueError on a bad combination), the same for every config."""
    contexts, batches = _ints(args.contexts), _ints(args.batch_sizes)
    skip = _skip(args.skip)
    numbers = {"--num-prompts": args.num_prompts, "--input-len": args.input_len}
    numbers |= {"--output-len": args.output_len, "--decode-tokens": args.decode_tokens}
    for flag, value in [*numbers.items(), *[("--contexts", c) for c in contexts]]:
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.decode_tokens < 2:
        raise ValueError("--decode-tokens must be >= 2 (ms/token is measured between the first and last)")
    if any(b < 1 for b in batches) or not batches:
        raise ValueError(f"--batch-sizes must be positive integers, got {args.batch_sizes!r}")
    for context in contexts:
        if context + args.decode_tokens > args.max_model_len:
            raise ValueError(
                f"context {context} + {args.decode_tokens} decode tokens > max_model_len "
                f"{args.max_model_len}; the longest allowed is {args.max_model_len - args.decode_tokens}"
            )
    if args.input_len + args.output_len > args.max_model_len:
        raise ValueError(f"--input-len + --output-len > max_model_len {args.max_model_len}")
    throughput = (
        None
        if args.no_throughput
        else {
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
        }
    )
    decode = (
        None
        if args.no_decode
        else {
            "contexts": contexts,
            "batch_sizes": batches,
            "tokens": args.decode_tokens,
            "skip": skip,
        }
    )
    engine = {
        "enforce_eager": True,
        "max_model_len": args.max_model_len,
        "block_size": BLOCK_SIZE,
        # The decode batch must run in one step, and the throughput prompts all at once.
        "max_num_seqs": max([args.num_prompts if throughput else 1, *batches]),
        "max_num_batched_tokens": max(args.max_num_batched_tokens, max(batches) * BLOCK_SIZE),
        "enable_prefix_caching": True,  # decode timing prefills once, then re-runs from the cache
        "gpu_memory_utilization": 0.5,
        "seed": args.seed,
    }
    return {
        "model": resolve_model(args.model),
        "kv_space_gib": args.kv_space_gib,
        "seed": args.seed,
        "engine": engine,
        "throughput": throughput,
        "decode": decode,
        "adakv_cpu_attention": os.environ.get("ADAKV_CPU_ATTENTION"),  # None: the plugin's default
    }


# ---- running one config ---------------------------------------------------------------------------
def run_config(config: EvalConfig, settings: dict, label: str, args: argparse.Namespace) -> dict:
    """Run one config's engine process; -> {"result": ... | None, "error": str | None, ...}."""
    with tempfile.TemporaryDirectory(prefix="adakv-compare-") as tmp:
        out = Path(tmp) / "result.json"
        spec = {
            "name": config.name,
            "model": settings["model"],
            "engine": settings["engine"],
            "llm_kwargs": config.llm_kwargs(),
            "seed": settings["seed"],
            "throughput": settings["throughput"],
            "decode": settings["decode"],
            "output": str(out),
        }
        env = {
            **envs.without_plugin_switch(os.environ),  # the config alone decides bf16 / fp8 / AdaKV
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in the child itself: its RSS is ours
            "VLLM_CPU_KVCACHE_SPACE": str(settings["kv_space_gib"]),
        }
        digest_before = package_digest()
        load_before = os.getloadavg()
        started = time.perf_counter()
        proc = subprocess.Popen(
            [*ENGINE_COMMAND, json.dumps(spec)],
            cwd=PACKAGE.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(args.timeout, kill) if args.timeout else None
        if timer:
            timer.start()
        tail: collections.deque[str] = collections.deque(maxlen=40)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(PROGRESS):
                print(f"{label} {line[len(PROGRESS) :].rstrip()}", file=sys.stderr, flush=True)
            else:
                tail.append(line)
                if args.verbose:
                    print(line, end="", file=sys.stderr, flush=True)
        rc = proc.wait()
        if timer:
            timer.cancel()
        record = {
            "config": dataclasses.asdict(config),
            "llm_kwargs": config.llm_kwargs(),
            "wall_seconds": time.perf_counter() - started,
            "loadavg_before": load_before,  # other work on the machine skews the timings
            "loadavg_after": os.getloadavg(),
            # sha256 of the package sources before / after: other work may edit the tree mid-run
            "package_digest": [digest_before, package_digest()],
            "result": json.loads(out.read_text()) if out.is_file() else None,
            "error": None,
        }
    if rc != 0:
        why = f"killed after --timeout {args.timeout:g} s" if timed_out.is_set() else f"exit code {rc}"
        record["error"] = f"{why}; last log lines:\n{''.join(tail)}"
        print(f"{label} {config.name} FAILED ({why}); continuing", file=sys.stderr, flush=True)
    return record


# ---- ratios, table, plot ---------------------------------------------------------------------------
def _ratio(x, ref):
    return None if x is None or not ref else x / ref


def ratios(runs: dict[str, dict]) -> dict[str, dict]:
    """{config: ratios against bf16}; empty when bf16 did not run."""
    ref = (runs.get(REFERENCE) or {}).get("result")
    if not ref:
        return {}
    out = {}
    for name, run in runs.items():
        res = run["result"]
        if not res:
            continue
        r = {
            "kv_capacity": _ratio(res.get("kv_capacity_tokens"), ref.get("kv_capacity_tokens")),
            "peak_rss": _ratio(res.get("peak_rss_mib"), ref.get("peak_rss_mib")),
        }
        for key in ("output_tokens_per_s", "total_tokens_per_s"):
            r[key] = _ratio((res.get("throughput") or {}).get(key), (ref.get("throughput") or {}).get(key))
        r["decode_ms_per_token"] = {
            ctx: {
                b: _ratio(
                    fig["ms_per_token"],
                    ((ref.get("decode") or {}).get(ctx) or {}).get(b, {}).get("ms_per_token"),
                )
                for b, fig in per_batch.items()
            }
            for ctx, per_batch in (res.get("decode") or {}).items()
        }
        out[name] = r
    return out


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def table(runs: dict[str, dict], rat: dict[str, dict], settings: dict) -> str:
    lines = [
        f"KV space {settings['kv_space_gib']} GiB, block_size {BLOCK_SIZE}, "
        f"ADAKV_CPU_ATTENTION={settings['adakv_cpu_attention'] or '(unset)'}; ratios vs {REFERENCE}",
        "",
        "| config | KV tokens | x | peak RSS MiB | x | output tok/s | x | total tok/s | x |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    points = []
    if settings["decode"]:
        skip = {tuple(p) for p in settings["decode"]["skip"]}
        points = [
            (b, c)
            for c in settings["decode"]["contexts"]
            for b in settings["decode"]["batch_sizes"]
            if (b, c) not in skip
        ]
    for name, run in runs.items():
        res, r = run["result"] or {}, rat.get(name, {})
        tp = res.get("throughput") or {}
        lines.append(
            f"| {name}{' (FAILED)' if run['error'] else ''} | {_fmt(res.get('kv_capacity_tokens'), ',')} "
            f"| {_fmt(r.get('kv_capacity'), '.2f')} | {_fmt(res.get('peak_rss_mib'), ',.0f')} "
            f"| {_fmt(r.get('peak_rss'), '.2f')} | {_fmt(tp.get('output_tokens_per_s'), '.1f')} "
            f"| {_fmt(r.get('output_tokens_per_s'), '.2f')} | {_fmt(tp.get('total_tokens_per_s'), '.1f')} "
            f"| {_fmt(r.get('total_tokens_per_s'), '.2f')} |"
        )
    if points:
        lines += [
            "",
            "Decode ms/token (one step of the whole batch, prefill excluded; x > 1: slower than bf16)",
            "",
            "| config | " + " | ".join(f"b{b} @ {c}" for b, c in points) + " |",
            "|---|" + "---:|" * len(points),
        ]
        for name, run in runs.items():
            decode = (run["result"] or {}).get("decode") or {}
            dr = rat.get(name, {}).get("decode_ms_per_token", {})
            cells = []
            for b, c in points:
                ms = (decode.get(str(c)) or {}).get(str(b), {}).get("ms_per_token")
                x = (dr.get(str(c)) or {}).get(str(b))
                cells.append("-" if ms is None else f"{ms:.1f}" + ("" if x is None else f" ({x:.2f}x)"))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Decode CPU ms per step (engine process, all threads) / median wall ms per step"
            " -- OpenMP threads spin while waiting, so other work on the machine inflates both",
            "",
            "| config | " + " | ".join(f"b{b} @ {c}" for b, c in points) + " |",
            "|---|" + "---:|" * len(points),
        ]
        for name, run in runs.items():
            decode = (run["result"] or {}).get("decode") or {}
            cells = []
            for b, c in points:
                fig = (decode.get(str(c)) or {}).get(str(b))
                cells.append(
                    "-"
                    if fig is None
                    else f"{fig['step_cpu_ms_mean']:.1f} / {fig['step_wall_ms_median']:.1f}"
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles, markers = ["-", "--", ":", "-."], ["o", "s", "^", "D"]
    batches = sorted(
        {int(b) for r in runs.values() for d in ((r["result"] or {}).get("decode") or {}).values() for b in d}
    )
    for i, (name, run) in enumerate(runs.items()):
        decode = (run["result"] or {}).get("decode") or {}
        for j, batch in enumerate(batches):
            xs = sorted(int(c) for c, d in decode.items() if str(batch) in d)
            if xs:
                ys = [decode[str(c)][str(batch)]["ms_per_token"] for c in xs]
                ax.plot(
                    xs,
                    ys,
                    styles[j % len(styles)],
                    marker=markers[j % len(markers)],
                    color=f"C{i}",
                    label=f"{name} batch {batch}",
                )
    ax.set_xlabel("context (prompt tokens)")
    ax.set_ylabel("decode ms/token (one step of the batch, log scale)")
    ax.set_yscale("log")
    ax.set_title("Decode step time: stock vLLM vs AdaKV")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- provenance ------------------------------------------------------------------------------------
def package_digest() -> str:
    """sha256 over the plugin's source files, as the engine processes will import them."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix in (".py", ".cpp", ".c", ".h") and path.is_file():
            h.update(str(path.relative_to(PACKAGE.parent)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def git_state() -> dict:
    """Commit and uncommitted package files of the source checkout the package runs from; None for
    both outside one (an installed package must not report a repository that encloses site-packages)."""
    checkout = PACKAGE.parent
    if not (checkout / ".git").exists():
        return {"git_commit": None, "git_uncommitted": None}
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True)
    # The engines import the working tree: uncommitted changes to the package are part of what ran.
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "adakv_vllm"], cwd=checkout, capture_output=True, text=True
    )
    return {
        "git_commit": git.stdout.strip() or None,
        "git_uncommitted": dirty.stdout.split("\n")[:-1] if dirty.returncode == 0 else None,
    }


def environment() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), None
    )
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
    return {
        "versions": {
            "vllm": _version("vllm", "vllm-cpu"),
            "torch": _version("torch"),
            "adakv_vllm": _version("adakv-vllm"),
            "python": sys.version.split()[0],
            **git_state(),
        },
        "cpu": {
            "model": model,
            "cores": os.cpu_count(),
            "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags],
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configs = [resolve_config(n.strip(), args.policy) for n in args.configs.split(",") if n.strip()]
        names = [c.name for c in configs]
        if not configs or len(set(names)) != len(names):
            raise ValueError(f"--configs must name each config once, got {args.configs!r}")
        settings = make_settings(args)
    except ValueError as e:
        print(f"adakv bench compare: error: {e}", file=sys.stderr)
        return 2
    started = time.time()
    runs: dict[str, dict] = {}
    for i, config in enumerate(configs, 1):
        label = f"[{i}/{len(configs)}]"
        print(f"{label} {config.name}: {config.llm_kwargs()}", file=sys.stderr, flush=True)
        runs[config.name] = run_config(config, settings, label, args)
    rat = ratios(runs)
    print(table(runs, rat, settings))
    digests = {d for run in runs.values() for d in run["package_digest"]}
    if len(digests) > 1:
        print(
            "WARNING: the adakv_vllm sources changed during the run; configs ran different code",
            file=sys.stderr,
        )
    report = {
        "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "seconds": time.time() - started,
        "settings": settings,
        **environment(),
        "package_changed_during_run": len(digests) > 1,
        "runs": runs,
        "ratios": rat,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(runs, args.plot)
    failed = [name for name, run in runs.items() if run["error"]]
    if failed:
        print(f"failed configs: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
