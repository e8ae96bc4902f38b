"""Serving side by side: `adakv serve` stock and with the plugin, each at its own defaults, driven by
vLLM's own client (`adakv bench serve`) through a sweep of request rates.

    python benchmarks/serve_sweep.py [--configs stock,adakv] [--rates 1,2,4,inf] [--num-prompts 64]
        [--input-len 512] [--output-len 128] [--repeats 1] [--server-arg=--enforce-eager ...] [--json F]

Per round, each config in turn (the order alternates between rounds): start `adakv serve MODEL` on
127.0.0.1 at a free port (`--kv-cache-plugin none` for stock; the plugin's defaults for adakv; the
same VLLM_CPU_KVCACHE_SPACE and --server-arg flags for both), wait for /health, send a few warm-up
requests (not recorded), run the client once per rate, then stop the server (SIGTERM to its process
group, SIGKILL after a grace period). The client uses the random dataset with ignore_eos and a seed
per rate: the two configs get the same prompts, and no rate re-reads another's from the prefix cache.
Reported per config and rate, from the client's --save-result JSON: request throughput, output
tokens/s, TTFT and ITL (inter-token latency) p50 / p99; median (min) over rounds and ratios against
stock oriented so that x > 1 is better. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from adakv_vllm import envs
from adakv_vllm.bench.figures import HIGHER, LOWER, cell, ratios, summarize, x_cell
from adakv_vllm.bench.process_tree import ProcessTree
from adakv_vllm.bench.provenance import PACKAGE, environment
from adakv_vllm.model_store import resolve_model

CLI = (sys.executable, "-m", "adakv_vllm.engine.cli")
CONFIGS = {"stock": ("--kv-cache-plugin", "none"), "adakv": ()}  # extra `adakv serve` flags per config
REFERENCE = "stock"
# (figure, key in vLLM's result JSON, which way is better, table header, format)
FIGURES = (
    ("request_throughput", "request_throughput", HIGHER, "req/s", ".2f"),
    ("output_tok_s", "output_throughput", HIGHER, "output tok/s", ".1f"),
    ("ttft_p50_ms", "p50_ttft_ms", LOWER, "TTFT p50 ms", ".0f"),
    ("ttft_p99_ms", "p99_ttft_ms", LOWER, "TTFT p99 ms", ".0f"),
    ("itl_p50_ms", "p50_itl_ms", LOWER, "ITL p50 ms", ".1f"),
    ("itl_p99_ms", "p99_itl_ms", LOWER, "ITL p99 ms", ".1f"),
)
KV_TOKENS = re.compile(r"KV cache size: ([\d,]+) tokens")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_result(data: dict) -> dict:
    """vLLM's `bench serve --save-result` JSON (run with --metric-percentiles 50,99) -> our figures."""
    missing = [key for _, key, *_ in FIGURES if key not in data]
    if missing:
        raise ValueError(f"the client's result has no {missing}: was it run with --metric-percentiles 50,99?")
    out = {name: float(data[key]) for name, key, *_ in FIGURES}
    out |= {k: data.get(k) for k in ("completed", "failed", "duration", "total_token_throughput")}
    return out


def parse_rates(text: str) -> list[float]:
    rates = []
    for item in [x.strip() for x in text.split(",") if x.strip()]:
        try:
            rate = float(item)
        except ValueError:
            rate = -1.0
        if not rate > 0:
            raise ValueError(f"--rates takes positive numbers or inf, e.g. 1,2,4,inf; got {item!r}")
        rates.append(rate)
    if not rates or len(set(rates)) != len(rates):
        raise ValueError(f"--rates must name each rate once, got {text!r}")
    return rates


def rate_name(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    return "".join(collections.deque(path.read_text(errors="replace").splitlines(True), maxlen=lines))


class Server:
    """`adakv serve` for one config on loopback, in its own process group, logging to a file."""

    def __init__(self, config: str, args: argparse.Namespace, model: str, log: Path):
        self.port, self.log = free_port(), log
        cmd = [
            *CLI, "serve", model, "--host", "127.0.0.1", "--port", str(self.port),
            *CONFIGS[config], *args.server_arg,
        ]  # fmt: skip
        env = {**envs.without_plugin_switch(os.environ), "VLLM_CPU_KVCACHE_SPACE": str(args.kv_space_gib)}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=PACKAGE.parent, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{_tail(self.log)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        raise RuntimeError(f"server not healthy after {timeout:g} s:\n{_tail(self.log)}")

    def kv_capacity_tokens(self) -> int | None:
        found = KV_TOKENS.findall(self.log.read_text(errors="replace"))
        return int(found[-1].replace(",", "")) if found else None

    def stop(self, grace: float = 60) -> None:
        """SIGTERM to the server's process group (its own, from start_new_session); SIGKILL to what is
        left of it after `grace` seconds, or once the server itself has exited."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def client_command(port: int, rate: float, seed: int, num_prompts: int, args, result: Path) -> list[str]:
    return [
        *CLI, "bench", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--num-prompts", str(num_prompts),
        "--request-rate", rate_name(rate), "--ignore-eos", "--seed", str(seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
        "--disable-tqdm", *args.client_arg,
    ]  # fmt: skip


def run_client(cmd: list[str], result: Path, timeout: float | None) -> dict:
    proc = subprocess.run(cmd, cwd=PACKAGE.parent, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"client exit code {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    raw = json.loads(result.read_text())
    return {**parse_result(raw), "client_result": raw}


def run_config(config: str, label: str, args: argparse.Namespace, model: str, tmp: Path) -> dict:
    """One server's life: start, warm up, every rate, stop. -> {"rates": {rate: figures | {"error"}}, ...}."""
    record: dict = {"config": config, "server_args": [*CONFIGS[config], *args.server_arg], "rates": {}}
    server = Server(config, args, model, tmp / f"{config}.log")
    record["server_pid"] = server.proc.pid
    progress(f"{label} {config}: starting `adakv serve` on port {server.port}")
    started = time.perf_counter()
    try:
        server.wait_healthy(args.startup_timeout)
        record["startup_s"] = time.perf_counter() - started
        record["kv_capacity_tokens"] = server.kv_capacity_tokens()
        progress(
            f"{label} {config}: healthy after {record['startup_s']:.0f} s, KV {record['kv_capacity_tokens']}"
        )
        if args.warmup_prompts:
            warm = tmp / "warmup.json"
            seed = args.seed + len(args.rates)  # prompts no rate sends
            run_client(
                client_command(server.port, math.inf, seed, args.warmup_prompts, args, warm), warm, None
            )
        for i, rate in enumerate(args.rates):
            result = tmp / f"{config}-{rate_name(rate)}.json"
            cmd = client_command(server.port, rate, args.seed + i, args.num_prompts, args, result)
            try:
                figs = run_client(cmd, result, args.timeout)
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
                record["rates"][rate_name(rate)] = {"error": str(e)}
                progress(f"{label} {config}: rate {rate_name(rate)} FAILED; continuing")
                continue
            record["rates"][rate_name(rate)] = figs
            progress(
                f"{label} {config}: rate {rate_name(rate)}: {figs['request_throughput']:.2f} req/s, "
                f"{figs['output_tok_s']:.1f} output tok/s, TTFT p50 {figs['ttft_p50_ms']:.0f} ms, "
                f"ITL p50 {figs['itl_p50_ms']:.1f} ms"
            )
        peaks = ProcessTree(server.proc.pid).peak_rss_mib()
        record["peak_rss_mib"] = sum(peaks.values()) if peaks else None
        record["error"] = None
    except RuntimeError as e:
        record["error"] = str(e)
        progress(f"{label} {config}: FAILED ({str(e).splitlines()[0]}); continuing")
    finally:
        server.stop()
    return record


def summarize_runs(runs: dict[str, list[dict]], rates: list[str]) -> dict:
    """{config: {rate: {figure: summary over rounds}}}."""
    out = {}
    for config, rounds in runs.items():
        out[config] = {}
        for rate in rates:
            figs = [r["rates"].get(rate) or {} for r in rounds]
            out[config][rate] = {name: summarize([f.get(name) for f in figs]) for name, *_ in FIGURES}
    return out


def ratio_table(summary: dict) -> dict:
    ref = summary.get(REFERENCE)
    if not ref:
        return {}
    better = {name: b for name, _, b, *_ in FIGURES}
    return {
        config: {
            rate: {name: ratios(s, ref[rate].get(name), better[name]) for name, s in figs.items()}
            for rate, figs in per_rate.items()
        }
        for config, per_rate in summary.items()
    }


def _lost(record: dict, rate: str) -> bool:
    """Whether a round measured nothing at `rate` (its server or its client failed)."""
    return "error" in record["rates"].get(rate, {"error": record["error"]})


def table(summary: dict, rat: dict, runs: dict, settings: dict) -> str:
    lines = [
        f"`adakv serve` at each config's own defaults; for both: VLLM_CPU_KVCACHE_SPACE="
        f"{settings['kv_space_gib']} GiB, server args {settings['server_args'] or 'none'}. Client: vLLM's "
        f"`bench serve`, random dataset, {settings['num_prompts']} prompts x {settings['input_len']} in / "
        f"{settings['output_len']} out per rate, ignore_eos.",
        f"Median (min) of {settings['repeats']} round(s); x = ratio against {REFERENCE}, > 1 = better "
        "(more requests or tokens/s, fewer ms).",
        "",
        "| config | KV tokens | startup s | peak RSS MiB |",
        "|---|---:|---:|---:|",
    ]
    for config, rounds in runs.items():
        figs = {
            k: summarize([r.get(k) for r in rounds])
            for k in ("kv_capacity_tokens", "startup_s", "peak_rss_mib")
        }
        failed = sum(1 for r in rounds if r["error"])
        name = config if not failed else f"{config} (FAILED {failed}/{len(rounds)})"
        lines.append(
            f"| {name} | {cell(figs['kv_capacity_tokens'], ',.0f')} | {cell(figs['startup_s'], '.0f')} "
            f"| {cell(figs['peak_rss_mib'], ',.0f')} |"
        )
    header = " | ".join(f"{label} | x" for *_, label, _ in FIGURES)
    lines += ["", f"| rate req/s | config | {header} | failed requests |", "|---|---|" + "---:|" * 13]
    for rate in settings["rates"]:
        for config in runs:
            figs, xs = summary[config][rate], rat.get(config, {}).get(rate, {})
            cells = " | ".join(
                f"{cell(figs[name], spec)} | {x_cell(xs.get(name))}" for name, *_, spec in FIGURES
            )
            failed = sum(int((r["rates"].get(rate) or {}).get("failed") or 0) for r in runs[config])
            lost = sum(1 for r in runs[config] if _lost(r, rate))
            lines.append(
                f"| {rate} | {config} | {cells} | {failed}{f' ({lost} runs lost)' if lost else ''} |"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="serve_sweep.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", default="stock,adakv", help=f"comma list of {sorted(CONFIGS)}")
    p.add_argument("--model", default=None, help="hub id or folder (default: the embedded SmolLM2)")
    p.add_argument("--rates", default="1,2,4,inf", help="request rates, req/s (default: %(default)s)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per rate")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--warmup-prompts", type=int, default=4, help="unrecorded requests after startup; 0: none")
    p.add_argument("--repeats", type=int, default=1, help="rounds, alternating the config order")
    p.add_argument("--server-arg", action="append", default=[], help="an `adakv serve` flag for both servers")
    p.add_argument("--client-arg", action="append", default=[], help="a `bench serve` flag for every call")
    p.add_argument("--kv-space-gib", default="4", help="VLLM_CPU_KVCACHE_SPACE for every server")
    p.add_argument("--seed", type=int, default=0, help="client seed of the first rate (+1 per rate)")
    p.add_argument("--startup-timeout", type=float, default=900, help="seconds to wait for /health")
    p.add_argument("--timeout", type=float, default=None, help="seconds per client call")
    p.add_argument("--json", type=Path, default=None, help="write everything here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        if not configs or len(set(configs)) != len(configs) or not set(configs) <= set(CONFIGS):
            raise ValueError(f"--configs takes each of {sorted(CONFIGS)} at most once, got {args.configs!r}")
        args.rates = parse_rates(args.rates)
        for flag in ("num_prompts", "input_len", "output_len", "repeats"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    except ValueError as e:
        print(f"serve_sweep: error: {e}", file=sys.stderr)
        return 2
    model = resolve_model(args.model)
    started = time.time()
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="adakv-serve-sweep-") as tmp:
        for r in range(args.repeats):
            order = configs if r % 2 == 0 else configs[::-1]
            for i, config in enumerate(order, 1):
                label = f"[round {r + 1}/{args.repeats} {i}/{len(order)}]"
                runs[config].append({"round": r + 1, **run_config(config, label, args, model, Path(tmp))})
    rates = [rate_name(rate) for rate in args.rates]
    settings = {
        "model": model,
        "kv_space_gib": args.kv_space_gib,
        "server_args": args.server_arg,
        "client_args": args.client_arg,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "rates": rates,
        "repeats": args.repeats,
        "seed": args.seed,
    }
    summary = summarize_runs(runs, rates)
    rat = ratio_table(summary)
    print(table(summary, rat, runs, settings))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
            "seconds": time.time() - started,
            "settings": settings,
            **environment(),
            "runs": runs,
            "summary": summary,
            "ratios": rat,
        }
        args.json.write_text(json.dumps(report, indent=1))
    lost = [config for config, rounds in runs.items() for r in rounds for rate in rates if _lost(r, rate)]
    if lost:
        print(f"configs with lost runs: {', '.join(sorted(set(lost)))}", file=sys.stderr)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
