"""E2E fixtures: each engine runs in its own subprocess (tests/e2e/probe.py) and reports JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "Write a haiku about autumn leaves:",
    "The largest planet in our solar system is",
    "To make a cup of tea, first",
]

# One KV budget for every capacity comparison (GiB, vLLM's own variable).
KV_SPACE_GIB = "2"
# vLLM's split-KV CPU attention (on by default) reduces partial results in an order that varies
# from run to run on this machine: stock vLLM reruns of the same 8 prompts differed in 4 of them
# (greedy near-ties flip). Token-for-token comparisons need a deterministic stock, so every engine
# of these tests runs without it (VLLM_CPU_ATTN_SPLIT_KV=0 is stock vLLM's own switch).
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": KV_SPACE_GIB, "VLLM_CPU_ATTN_SPLIT_KV": "0"}


def run_probe(spec: dict, env: dict | None = None, timeout: int = 600) -> dict:
    full_env = {**os.environ, **ENGINE_ENV, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.e2e.probe", json.dumps(spec)],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE-RESULT "):
            return json.loads(line[len("PROBE-RESULT ") :])
    raise AssertionError(f"probe failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="session")
def probe():
    """Memoised runner: the same spec runs once per test session."""
    cache: dict[str, dict] = {}

    def run(spec: dict, env: dict | None = None) -> dict:
        key = json.dumps([spec, env], sort_keys=True)
        if key not in cache:
            cache[key] = run_probe(spec, env)
        return cache[key]

    return run
