"""What changes when the plugin is switched on: stock vLLM and AdaKV side by side, each at ITS OWN defaults.

    adakv bench compare [--configs bf16,fp8,adakv] [--repeats 2] [--decode-points 8x2048,16x4096,1x4096]
        [--engine-arg KEY=VALUE ...] [--enforce-eager] [--json F] [--plot F.png]
    python benchmarks/compare.py ...    (the same, from a source tree)

Configs: `bf16` and `fp8` are stock vLLM exactly as `LLM(model)` configures it on CPU (kv_cache_dtype
auto / fp8); `adakv` is `LLM(model, additional_config={"kv_cache_plugin": "adakv"})`, the plugin at its
own defaults; `adakvN` sets target_bits N (and `--policy` when given); every name of
adakv_vllm/eval/configs.py (static4, rule3, ...) works too. The benchmark sets no block size,
max_num_seqs, max_num_batched_tokens, prefix caching or enforce_eager: the engines resolve their own
(the report lists what each resolved). Settings the user passes (`--engine-arg KEY=VALUE`,
`--enforce-eager`) apply to every config alike, and so does what the benchmark must set:
VLLM_CPU_KVCACHE_SPACE (default 4 GiB; with it vLLM also skips its check of gpu_memory_utilization
against the free memory of the NUMA node, which its default 0.92 fails on a busy machine) and
disable_log_stats=False (vLLM keeps per-request timestamps only with stats on).

Phases per config (compare_engine.py; everything AdaKV adds runs inside the timers):
  - throughput: N random-token prompts in one generate call (default 32 x 512 in / 128 out,
    ignore_eos): output and total tokens/s;
  - cold decode at each point BxC (default 8x2048, 64 new tokens): prompts never seen before, so
    their blocks are prefilled and sealed during the call: decode ms/token per request from vLLM's
    timestamps (first -> last token), TTFT, and the wall time of the call;
  - warm decode: the same prompts again from the prefix cache, reported beside cold, never instead;
  - capacity: vLLM's KV tokens (num blocks x block size) and peak RSS of the engine's processes.
Rounds (--repeats R): each round runs every config in a fresh engine process, alternating the order
(A B, B A, ...); the report gives min and median of every figure and ratios against bf16, oriented
so that x > 1 is better. A config that crashes is recorded with its error and the others still run;
the exit code is then 1. ADAKV_CPU_ATTENTION is recorded, not set.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from adakv_vllm import envs
from adakv_vllm.bench import compare_report
from adakv_vllm.bench.provenance import PACKAGE, environment, package_digest
from adakv_vllm.config import POLICIES, AdaKVConfig
from adakv_vllm.eval.configs import CONFIGS, EvalConfig
from adakv_vllm.model_store import resolve_model

# `-m` with cwd=PACKAGE.parent: the engine process imports the same adakv_vllm as this one.
ENGINE_COMMAND = (sys.executable, "-m", "adakv_vllm.bench.compare_engine")
DEFAULT_CONFIGS = "bf16,fp8,adakv"
ADAKV_NAME = re.compile(r"adakv(\d+(?:\.\d+)?)?")
PROGRESS = "PROGRESS "  # compare_engine.py's progress lines
# Engine keywords the configs or the benchmark own; --engine-arg may not set them.
RESERVED_ENGINE_ARGS = ("model", "kv_cache_dtype", "additional_config", "disable_log_stats")
SET_FOR_EVERY_CONFIG = ("disable_log_stats=False (per-request timestamps)",)


def resolve_config(name: str, policy: str | None = None) -> EvalConfig:
    """bf16 | fp8 | adakv (the plugin's defaults) | adakvN (target_bits N, `policy` if given) | a name
    of eval/configs.py."""
    if name in CONFIGS:
        return CONFIGS[name]
    match = ADAKV_NAME.fullmatch(name)
    if match is None:
        raise ValueError(
            f"unknown config {name!r}; choose adakv, adakvN (e.g. adakv4, adakv2.5) or {sorted(CONFIGS)}"
        )
    if match.group(1) is None:
        return EvalConfig(name, {}, nominal_bits=AdaKVConfig().target_bits)
    options = {"target_bits": float(match.group(1)), **({"policy": policy} if policy else {})}
    AdaKVConfig.from_options(options)  # ValueError naming the allowed values, before any engine starts
    return EvalConfig(name, options, nominal_bits=options["target_bits"])


def parse_points(text: str) -> list[tuple[int, int]]:
    """`8x2048,1x4096` -> [(batch, context), ...]."""
    points = []
    for item in [x.strip() for x in text.split(",") if x.strip()]:
        batch, sep, context = item.partition("x")
        if not sep or not batch.isdigit() or not context.isdigit() or int(batch) < 1 or int(context) < 1:
            raise ValueError(f"--decode-points takes BATCHxCONTEXT items, e.g. 8x2048,1x4096; got {item!r}")
        points.append((int(batch), int(context)))
    if len(set(points)) != len(points):
        raise ValueError(f"--decode-points names a point twice: {text!r}")
    return points


def parse_engine_args(items: list[str]) -> dict:
    """["max_model_len=4096", "enable-prefix-caching=false"] -> {name: JSON value, else the string}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("--").replace("-", "_")
        if not sep or not key.isidentifier():
            raise ValueError(f"--engine-arg takes KEY=VALUE (an LLM(...) keyword), got {item!r}")
        if key in RESERVED_ENGINE_ARGS:
            raise ValueError(f"--engine-arg {key}: the configs or the benchmark set {RESERVED_ENGINE_ARGS}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _model_max_len(model: str, engine_args: dict) -> int | None:
    """The context limit the engines will have: the user's max_model_len, else the model's own."""
    if "max_model_len" in engine_args:
        return int(engine_args["max_model_len"])
    config = Path(model) / "config.json"
    if not config.is_file():
        return None  # a hub id: the engine reports an over-long prompt itself
    return json.loads(config.read_text()).get("max_position_embeddings")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adakv bench compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma list (default: %(default)s)")
    p.add_argument("--policy", default=None, choices=POLICIES, help="policy of the adakvN configs")
    p.add_argument("--model", default=None, help="hub id or folder (default: the embedded SmolLM2)")
    p.add_argument("--num-prompts", type=int, default=32, help="throughput prompts")
    p.add_argument("--input-len", type=int, default=512, help="throughput prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="throughput generated tokens")
    p.add_argument("--decode-points", default="8x2048", help="BATCHxCONTEXT list (default: %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=64, help="generated tokens per decode request")
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput phase")
    p.add_argument("--no-decode", action="store_true", help="skip the decode phases")
    p.add_argument("--repeats", type=int, default=2, help="rounds, alternating the config order")
    p.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an LLM(...) keyword for EVERY config (repeatable; VALUE is JSON, else a string)",
    )
    p.add_argument("--enforce-eager", action="store_true", help="= --engine-arg enforce_eager=true")
    p.add_argument("--kv-space-gib", default="4", help="VLLM_CPU_KVCACHE_SPACE for every config")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--timeout", type=float, default=None, help="seconds per engine before it is killed")
    p.add_argument("--json", type=Path, default=None, help="write everything here")
    p.add_argument("--plot", type=Path, default=None, help="PNG of every figure's ratio against bf16")
    p.add_argument("--verbose", action="store_true", help="show vLLM's own log of every engine")
    return p


def make_settings(args: argparse.Namespace) -> dict:
    """Validated benchmark settings (ValueError on a bad combination), the same for every config."""
    numbers = {"--num-prompts": args.num_prompts, "--input-len": args.input_len}
    numbers |= {"--output-len": args.output_len, "--repeats": args.repeats}
    for flag, value in numbers.items():
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.decode_tokens < 2:
        raise ValueError("--decode-tokens must be >= 2 (ms/token is measured between the first and last)")
    points = parse_points(args.decode_points)
    if not points and not args.no_decode:
        raise ValueError("--decode-points is empty; pass --no-decode to skip the decode phases")
    engine_args = parse_engine_args(args.engine_arg)
    if args.enforce_eager:
        engine_args["enforce_eager"] = True
    model = resolve_model(args.model)
    limit = _model_max_len(model, engine_args)
    if limit is not None:
        for batch, context in [] if args.no_decode else points:
            if context + args.decode_tokens > limit:
                raise ValueError(
                    f"decode point {batch}x{context}: {context} + {args.decode_tokens} decode tokens > "
                    f"max_model_len {limit}; the longest context allowed is {limit - args.decode_tokens}"
                )
        if not args.no_throughput and args.input_len + args.output_len > limit:
            raise ValueError(f"--input-len + --output-len > max_model_len {limit}")
    throughput = {"num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len}
    return {
        "model": model,
        "kv_space_gib": args.kv_space_gib,
        "seed": args.seed,
        "repeats": args.repeats,
        "engine_args": engine_args,
        "set_for_every_config": list(SET_FOR_EVERY_CONFIG),
        "throughput": None if args.no_throughput else throughput,
        "decode": None if args.no_decode else {"points": points, "tokens": args.decode_tokens},
        "adakv_cpu_attention": os.environ.get("ADAKV_CPU_ATTENTION"),  # None: the plugin's default
        "vllm_env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")},
    }


def _kill_group(pgid: int) -> None:
    """SIGKILL the process group an engine process leads (start_new_session), if any of it is left."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_config(config: EvalConfig, settings: dict, label: str, args: argparse.Namespace) -> dict:
    """Run one config's engine process once; -> {"result": ... | None, "error": str | None, ...}."""
    with tempfile.TemporaryDirectory(prefix="adakv-compare-") as tmp:
        out = Path(tmp) / "result.json"
        spec = {
            "name": config.name,
            "model": settings["model"],
            "engine_args": settings["engine_args"],
            "llm_kwargs": config.llm_kwargs(),
            "seed": settings["seed"],
            "throughput": settings["throughput"],
            "decode": settings["decode"],
            "output": str(out),
        }
        env = {
            **envs.without_plugin_switch(os.environ),  # the config alone decides bf16 / fp8 / AdaKV
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
            start_new_session=True,  # its own process group: a timeout ends vLLM's children too
        )
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            _kill_group(proc.pid)

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
        _kill_group(proc.pid)  # whatever of vLLM's children outlived the engine process
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
    runs: dict[str, list[dict]] = {c.name: [] for c in configs}
    for r in range(args.repeats):
        order = configs if r % 2 == 0 else configs[::-1]
        for i, config in enumerate(order, 1):
            label = f"[round {r + 1}/{args.repeats} {i}/{len(order)}]"
            print(f"{label} {config.name}: {config.llm_kwargs()}", file=sys.stderr, flush=True)
            record = run_config(config, settings, label, args)
            runs[config.name].append({"round": r + 1, "position": i, **record})
    summary = compare_report.summarize_runs(runs)
    rat = compare_report.ratio_table(summary)
    print(compare_report.table(runs, summary, rat, settings))
    digests = {d for rounds in runs.values() for run in rounds for d in run["package_digest"]}
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
        "summary": summary,
        "ratios": rat,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    if args.plot:
        compare_report.plot(rat, args.plot)
    failed = [name for name, rounds in runs.items() if any(run["error"] for run in rounds)]
    if failed:
        print(f"failed configs: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
