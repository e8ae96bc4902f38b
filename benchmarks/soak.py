"""`make soak`: `adakv serve` on loopback under a bounded, mixed load, then checks it survived intact.

    python benchmarks/soak.py [--seconds 600] [--concurrency 8] [--json soak.json]

Load (each worker thread draws a kind at random; bursts of --burst requests every --burst-every s):
    plain        non-streaming completion
    stream       streaming completion read to the end
    abort        streaming completion dropped after a few chunks (the client closes the connection)
    long         a prompt near max_model_len
    too_long     a prompt beyond max_model_len: must be refused cleanly (HTTP 400), nothing else
    n3           n = 3 samples at temperature 0.8
    prefix       one of a few long shared prefixes + a short suffix (prefix-cache hits on sealed pages)
    json         chat completion with a JSON-schema response format (structured output)
    poison       a prompt with the poison token: its K/V are NaN (ADAKV_TEST_POISON_TOKEN, engine/faults.py)
Checks: every request answered, or refused with a 4xx where refusal is right (too_long); no 5xx and
no dropped connection otherwise; the server process never exited; /health fine at the end; staging
back to zero slots once idle (ADAKV_STATS_FILE); RSS growth of the server's process tree bounded.
Prints the figures and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
}
WORDS = "the river crossed a quiet valley where old stone bridges carried traders north each spring".split()
KINDS = ("plain", "stream", "abort", "long", "too_long", "n3", "prefix", "json", "poison")
WEIGHTS = (4, 4, 3, 1, 1, 2, 3, 2, 0)  # poison is sent once, by the harness itself


def text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


class Soak:
    def __init__(self, base: str, model: str, max_model_len: int, poison_word: str):
        self.base, self.model, self.max_model_len = base, model, max_model_len
        self.poison_word = poison_word
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.prefixes = [text(600, 1000 + i) for i in range(3)]

    def record(self, kind: str, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.counts[(kind, outcome)] += 1
            if outcome == "FAILED":
                self.failures.append(f"{kind}: {detail[:300]}")

    def one(self, client: httpx.Client, kind: str, seed: int) -> None:
        try:
            outcome = getattr(self, f"_{kind}")(client, seed)
            self.record(kind, outcome)
        except Exception as e:  # a dropped connection or a 5xx: the engine misbehaved
            self.record(kind, "FAILED", repr(e))

    def _completion(self, client, prompt, **extra) -> dict:
        body = {"model": self.model, "prompt": prompt, "max_tokens": 32, "temperature": 0, **extra}
        r = client.post(f"{self.base}/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
        out = r.json()
        if not out["choices"]:
            raise RuntimeError("no choices")
        return out

    def _plain(self, client, seed):
        self._completion(client, text(40, seed))
        return "ok"

    def _n3(self, client, seed):
        out = self._completion(client, text(30, seed), n=3, temperature=0.8, seed=seed)
        if len(out["choices"]) != 3:
            raise RuntimeError(f"{len(out['choices'])} choices for n=3")
        return "ok"

    def _long(self, client, seed):
        # ~1.3 tokens per word here: stay safely under max_model_len with 32 new tokens
        self._completion(client, text(int((self.max_model_len - 200) / 1.4), seed))
        return "ok"

    def _too_long(self, client, seed):
        body = {"model": self.model, "prompt": text(self.max_model_len * 2, seed), "max_tokens": 16}
        r = client.post(f"{self.base}/v1/completions", json=body)
        if r.status_code != 400:
            raise RuntimeError(f"expected a clean 400 for a prompt beyond max_model_len, got {r.status_code}")
        return "refused"

    def _prefix(self, client, seed):
        self._completion(client, self.prefixes[seed % 3] + " " + text(8, seed))
        return "ok"

    def _poison(self, client, seed):
        self._completion(client, f"Our {self.poison_word} word starts here: " + text(40, seed), max_tokens=48)
        return "ok"

    def _stream(self, client, seed, abort_after: int | None = None):
        body = {"model": self.model, "prompt": text(40, seed), "max_tokens": 48, "stream": True}
        with client.stream("POST", f"{self.base}/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}")
            chunks = 0
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks += 1
                    if abort_after is not None and chunks >= abort_after:
                        return "aborted"  # leaving the context closes the connection mid-stream
                if line == "data: [DONE]":
                    return "ok"
        raise RuntimeError("stream ended without [DONE]")

    def _abort(self, client, seed):
        return self._stream(client, seed, abort_after=3)

    def _json(self, client, seed):
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": f"Name a city and its population. {text(8, seed)}"}],
            "max_tokens": 48,
            "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}},
        }
        r = client.post(f"{self.base}/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
        content = r.json()["choices"][0]["message"]["content"]
        try:
            json.loads(content)
        except json.JSONDecodeError:
            return "truncated"  # 48 tokens may end mid-object: answered, the grammar held while it ran
        return "ok"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mib(pid: int) -> float:
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def wait_healthy(base: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited during start-up (code {server.returncode})")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"the server was not healthy after {timeout:.0f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600, help="load duration (default: 10 minutes)")
    ap.add_argument("--concurrency", type=int, default=8, help="client threads")
    ap.add_argument("--burst", type=int, default=16, help="requests in a burst")
    ap.add_argument("--burst-every", type=float, default=60, help="seconds between bursts")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-rss-growth", type=float, default=0.25, help="allowed growth of the tree's RSS")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from adakv_vllm.model_store import resolve_model

    model = resolve_model(None)
    poison_word = " xylophone"
    poison_token = AutoTokenizer.from_pretrained(model)(poison_word, add_special_tokens=False)["input_ids"][0]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp(prefix="adakv-soak-"))
    stats_path = work / "stats.json"
    env = {
        **os.environ,
        "ADAKV_STATS_FILE": str(stats_path),
        "ADAKV_TEST_POISON_TOKEN": str(poison_token),
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
    }
    cmd = [
        sys.executable, "-m", "adakv_vllm.engine.cli", "serve", model, "--host", "127.0.0.1",
        "--port", str(port), "--max-model-len", str(args.max_model_len), "--enforce-eager",
        "--gpu-memory-utilization", "0.5",
    ]  # fmt: skip
    log = open(work / "server.log", "w")
    print(f"[soak] starting: {' '.join(cmd[2:])} (log {work / 'server.log'})", file=sys.stderr, flush=True)
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    checks: dict[str, bool] = {}
    figures: dict = {}
    try:
        wait_healthy(base, server, timeout=600)
        soak = Soak(base, model, args.max_model_len, poison_word)
        with httpx.Client(timeout=300) as client:
            soak.one(client, "plain", 0)  # warm-up before the RSS baseline
        rss_start = tree_rss_mib(server.pid)
        stop = time.time() + args.seconds
        seeds = iter(range(1, 10**9))
        seed_lock = threading.Lock()

        def next_seed() -> int:
            with seed_lock:
                return next(seeds)

        def worker(wid: int) -> None:
            rng = random.Random(wid)
            with httpx.Client(timeout=600) as client:
                if wid == 0:
                    soak.one(client, "poison", next_seed())
                while time.time() < stop:
                    soak.one(client, rng.choices(KINDS, WEIGHTS)[0], next_seed())

        def bursts() -> None:
            while time.time() + args.burst_every < stop:
                time.sleep(args.burst_every)
                with httpx.Client(timeout=600) as client:
                    threads = [
                        threading.Thread(target=soak.one, args=(client, "plain", next_seed()))
                        for _ in range(args.burst)
                    ]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.concurrency)]
        threads.append(threading.Thread(target=bursts))
        last_report = time.time()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(1)
            if time.time() - last_report > 30:
                last_report = time.time()
                done = sum(soak.counts.values())
                print(f"[soak] {done} requests, {len(soak.failures)} failed", file=sys.stderr, flush=True)
        time.sleep(5)  # idle: the engine hands the last blocks over and stops stepping
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        rss_end = tree_rss_mib(server.pid)
        health = httpx.get(f"{base}/health", timeout=10).status_code
        figures = {
            "seconds": args.seconds,
            "requests": sum(soak.counts.values()),
            "by_kind": {f"{k}/{o}": n for (k, o), n in sorted(soak.counts.items())},
            "failures": soak.failures[:20],
            "staging": stats,
            "rss_mib": {"start": round(rss_start), "end": round(rss_end)},
            "health": health,
        }
        checks = {
            "every request answered or cleanly refused": not soak.failures,
            "server never exited": server.poll() is None,
            "/health is 200": health == 200,
            "staging back to 0 when idle": stats.get("staging_used") == 0,
            "poisoned request sanitised, not fatal": stats.get("sanitized_requests", 0) >= 1,
            f"RSS growth <= {args.max_rss_growth:.0%}": rss_end <= rss_start * (1 + args.max_rss_growth),
        }
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()
    print(json.dumps(figures, indent=1))
    for name, ok in checks.items():
        print(f"[{'ok' if ok else 'FAILED'}] {name}")
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "checks": checks}, indent=1))
    return 0 if checks and all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
