"""benchmarks/serve_sweep.py for real on tiny settings: both servers start, vLLM's client measures
each, and the servers are gone afterwards (slow: two server startups, ~4 min on 2 cores)."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from tests.e2e.conftest import KV_SPACE_GIB, ROOT


@pytest.mark.slow
def test_serve_sweep_measures_stock_and_adakv(tmp_path):
    out = tmp_path / "sweep.json"
    cmd = [
        sys.executable, "benchmarks/serve_sweep.py", "--rates", "inf", "--num-prompts", "2",
        "--input-len", "64", "--output-len", "8", "--warmup-prompts", "0", "--server-arg=--enforce-eager",
        "--kv-space-gib", KV_SPACE_GIB, "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    stock, adakv = report["runs"]["stock"][0], report["runs"]["adakv"][0]
    for run in (stock, adakv):
        figs = run["rates"]["inf"]
        assert run["error"] is None and figs["completed"] == 2 and figs["failed"] == 0
        assert figs["request_throughput"] > 0 and figs["ttft_p50_ms"] > 0 and figs["itl_p99_ms"] > 0
    assert adakv["kv_capacity_tokens"] > 3 * stock["kv_capacity_tokens"] > 0
    assert report["ratios"]["adakv"]["inf"]["output_tok_s"]["median"] > 0
    assert "| inf | adakv |" in proc.stdout
    assert not psutil.pid_exists(stock["server_pid"]) and not psutil.pid_exists(adakv["server_pid"])
