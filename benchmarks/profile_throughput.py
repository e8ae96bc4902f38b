"""Where a throughput run's time goes: one engine in this process under cProfile, stock or AdaKV.

    python benchmarks/profile_throughput.py [--config adakv|stock] [--option KEY=VALUE ...]
        [--num-prompts 32 --input-len 512 --output-len 128] [--top 25] [--out prof.pstats]
        [--no-profile | --timers]

The engine runs at its own defaults (nothing set but VLLM_CPU_KVCACHE_SPACE, default 4 GiB), in
this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that one profile sees the scheduler, the worker
and the attention backend. The profiled region is one `generate` call over random-token prompts
(ignore_eos), after a warm-up call. cProfile slows Python-heavy code more than torch kernels, so
shares are indicative; the wall time without the profiler (the first half of the prompts, in a
call of its own) is printed too. `--no-profile` times both halves without it; `--option` passes an
AdaKV option (JSON value), e.g. `--option staging_fraction=0.2` (the worst-case reserve at 4 GiB).

AdaKV's code is entered from vLLM's: the report sums, for every function of adakv_vllm, the
cumulative time of the calls made to it from outside adakv_vllm (so nothing is counted twice). Those
entry points include wrappers around vLLM's own work (the worker's execute_model holds the whole
model forward), so they are listed, not called overhead; the pieces that are AdaKV's own work
(sealing, staging writes, the attention policy's measurement, the scheduler) are listed apart by
their cumulative time, beside the attention paths (which replace stock's attention).

`--timers` measures those pieces without the profiler (whose per-call cost inflates Python-heavy
pieces several-fold): each is wrapped in a wall-clock timer (perf_counter, about a microsecond per
call) around the second call, and its seconds and share of that call's wall time are printed; the
scheduler's own work is AdaKV's schedule() minus the stock schedule() it calls. Run it for both
configs: stock's cache writes and scheduling are the equivalents AdaKV's pieces replace.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import functools
import json
import os
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PACKAGE = str(ROOT / "adakv_vllm")
CONFIGS = {"stock": {"kv_cache_plugin": "none"}, "adakv": {"kv_cache_plugin": "adakv"}}


def _ours(func: tuple) -> bool:
    return func[0].startswith(PACKAGE)


def entry_points(stats: pstats.Stats) -> dict[str, float]:
    """adakv_vllm function -> cumulative seconds of the calls it received from outside adakv_vllm."""
    out: dict[str, float] = {}
    for func, (_cc, _nc, _tt, _ct, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if not _ours(func):
            continue
        outside = sum(edge[3] for caller, edge in callers.items() if not _ours(caller))
        if outside > 0:
            name = f"{Path(func[0]).relative_to(ROOT)}:{func[1]}({func[2]})"
            out[name] = out.get(name, 0.0) + outside
    return out


# (file in adakv_vllm, function) -> what it is; the attention paths replace stock's attention
PIECES = {
    ("blocks/store.py", "seal"): "sealing pages",
    ("blocks/store.py", "write"): "staging writes",
    ("blocks/store.py", "observe_attention"): "attention policy's measurement",
    ("blocks/store.py", "step_features"): "quantization-error feature",
    ("engine/scheduler.py", "schedule"): "scheduler (stock's scheduling included)",
    ("engine/scheduler.py", "update_from_output"): "scheduler output (stock's included)",
    ("attention/backend.py", "fused_decode"): "attention: fused decode kernel",
    ("attention/backend.py", "_scratch_forward"): "attention: prefill scratch path",
}


def pieces(stats: pstats.Stats) -> dict[str, float]:
    out = dict.fromkeys(PIECES.values(), 0.0)
    for func, (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if _ours(func):
            label = PIECES.get((str(Path(func[0]).relative_to(ROOT / "adakv_vllm")), func[2]))
            if label is not None:
                out[label] += ct
    return out


# label -> (module, class or None for a module-level function, name) wrapped by --timers; a call
# nested in one of its own label (a subclass's method calling its parent's) is counted once
TIMED = {
    "sealing pages": ("adakv_vllm.blocks.store", "KVStore", "seal"),
    "staging writes": ("adakv_vllm.blocks.store", "KVStore", "write"),
    "attention policy's measurement": ("adakv_vllm.blocks.store", "KVStore", "observe_attention"),
    "quantization-error feature": ("adakv_vllm.blocks.store", "KVStore", "step_features"),
    "AdaKV schedule()": ("adakv_vllm.engine.scheduler", "AdaKVScheduler", "schedule"),
    "  of which seal planning": ("adakv_vllm.engine.scheduler", "AdaKVScheduler", "_plan"),
    "AdaKV update_from_output()": ("adakv_vllm.engine.scheduler", "AdaKVScheduler", "update_from_output"),
    "stock schedule()": ("vllm.v1.core.sched.scheduler", "Scheduler", "schedule"),
    "stock update_from_output()": ("vllm.v1.core.sched.scheduler", "Scheduler", "update_from_output"),
    "stock cache writes": (
        "vllm.v1.attention.backends.cpu_attn",
        "CPUAttentionBackendImpl",
        "do_kv_cache_update",
    ),
    "attention (AdaKV's forward)": ("adakv_vllm.attention.backend", "AdaKVAttentionImpl", "forward"),
    "  of which prefill scratch copy": ("adakv_vllm.attention.backend", None, "gather_scratch"),
    "attention (stock's forward)": (
        "vllm.v1.attention.backends.cpu_attn",
        "CPUAttentionBackendImpl",
        "forward",
    ),
}
OWN_WORK = ("sealing pages", "staging writes", "attention policy's measurement", "quantization-error feature")


class Timers:
    """Wall-clock seconds per label of the methods in TIMED, while `on`."""

    def __init__(self):
        self.on = False
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self._depth: dict[str, int] = collections.defaultdict(int)

    def install(self) -> None:
        import importlib

        for label, (module, cls, name) in TIMED.items():
            owner = importlib.import_module(module)
            if cls is not None:
                owner = getattr(owner, cls)
            setattr(owner, name, self._timed(label, vars(owner)[name]))

    def _timed(self, label: str, method):
        @functools.wraps(method)
        def timed(*args, **kwargs):
            if not self.on or self._depth[label]:
                return method(*args, **kwargs)
            self._depth[label] += 1
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started
                self._depth[label] -= 1

        return timed

    def report(self, wall: float) -> None:
        s = self.seconds
        scheduler = s["AdaKV schedule()"] - s["stock schedule()"]
        scheduler += s["AdaKV update_from_output()"] - s["stock update_from_output()"]
        lines = [(s[label], label) for label in TIMED if s[label]]
        if s["AdaKV schedule()"]:
            own = sum(s[label] for label in OWN_WORK) + scheduler
            lines.append((scheduler, "AdaKV's scheduler work (beyond stock's)"))
            lines.append((own, "AdaKV's own work (the four pieces above + scheduler work)"))
        for seconds, label in lines:
            print(f"  {seconds:8.3f} s  {100 * seconds / wall:5.1f}%  {label}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=CONFIGS, default="adakv")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None, help="also write the raw pstats here")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="AdaKV option")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--no-profile", action="store_true", help="time both halves, no profiler")
    mode.add_argument(
        "--timers", action="store_true", help="time AdaKV's pieces with wall-clock timers, no profiler"
    )
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

    import numpy as np
    from vllm import LLM, SamplingParams

    from adakv_vllm.model_store import resolve_model

    options = dict(CONFIGS[args.config])
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = json.loads(value)
    timers = Timers()
    if args.timers:
        timers.install()  # before the engine starts: vLLM binds some methods at construction
    llm = LLM(resolve_model(None), additional_config=options)
    rng = np.random.default_rng(0)
    prompts = [
        {"prompt_token_ids": rng.integers(1000, 20000, args.input_len).tolist()}
        for _ in range(args.num_prompts)
    ]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    llm.generate("Warm-up:", SamplingParams(max_tokens=4), use_tqdm=False)
    started = time.perf_counter()
    llm.generate(prompts[: len(prompts) // 2], params, use_tqdm=False)
    plain = time.perf_counter() - started
    if args.no_profile:
        started = time.perf_counter()
        llm.generate(prompts[len(prompts) // 2 :], params, use_tqdm=False)
        second = time.perf_counter() - started
        tokens = len(prompts) * args.output_len
        rate = tokens / (plain + second)
        print(f"config {args.config} {options}: {plain:.2f} s + {second:.2f} s, {rate:.1f} output tok/s")
        return 0
    if args.timers:
        timers.on = True
        started = time.perf_counter()
        llm.generate(prompts[len(prompts) // 2 :], params, use_tqdm=False)
        wall = time.perf_counter() - started
        half = args.num_prompts // 2
        print(f"config {args.config}: {half} prompts x {args.input_len} in / {args.output_len} out per call")
        print(f"wall: first call (no timers) {plain:.2f} s, timed call {wall:.2f} s; wall-clock timers:")
        timers.report(wall)
        return 0
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    llm.generate(prompts[len(prompts) // 2 :], params, use_tqdm=False)
    profiler.disable()
    wall = time.perf_counter() - started
    if args.out:
        profiler.dump_stats(args.out)
    stats = pstats.Stats(profiler)
    entries = sorted(entry_points(stats).items(), key=lambda kv: -kv[1])
    half = args.num_prompts // 2
    print(f"config {args.config}: {half} prompts x {args.input_len} in / {args.output_len} out per call")
    print(f"wall without the profiler {plain:.2f} s, with it {wall:.2f} s")
    print("calls into adakv_vllm from vLLM (cumulative; wrappers include vLLM's own work):")
    for name, seconds in entries[: args.top]:
        print(f"  {seconds:8.3f} s  {100 * seconds / wall:5.1f}%  {name}")
    print("AdaKV's pieces (cumulative time of each):")
    for label, seconds in pieces(stats).items():
        print(f"  {seconds:8.3f} s  {100 * seconds / wall:5.1f}%  {label}")
    print("\ntop functions by cumulative time (everything):")
    stats.sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
