"""`adakv eval` end to end (tiny limits) and lm-eval-harness as a real client of the plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import KV_SPACE_GIB, ROOT

ARC_LIMIT = 40


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    cmd = [
        sys.executable, "-m", "adakv_vllm.engine.cli", "eval",
        "--tasks", "wikitext,arc_easy", "--configs", "bf16,static2,rule3",
        "--limit", str(ARC_LIMIT), "--wikitext-limit", "2", "--wikitext-window", "256",
        "--out", str(out), "--kv-space-gib", KV_SPACE_GIB,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, cmd


def test_eval_reports_through_the_plugin(eval_dir):
    out, _ = eval_dir
    results = {name: json.loads((out / f"{name}.json").read_text()) for name in ("bf16", "static2", "rule3")}
    wiki = {k: v["results"]["wikitext"] for k, v in results.items()}
    assert wiki["bf16"]["kl"] == [0.0, 0.0] and wiki["bf16"]["quantized_reads"] == 0.0
    # 2-bit pages really are read: KL > 0 and most attention reads come from sealed pages
    assert min(wiki["static2"]["kl"]) > 0 and wiki["static2"]["quantized_reads"] > 0.5
    assert wiki["static2"]["ppl"] > wiki["bf16"]["ppl"]
    # code bits: pages are whole bytes per (head, token) in vLLM's spec, the rounding slack goes to values
    assert results["static2"]["avg_bits"] == 2.0 and 2.5 <= results["rule3"]["avg_bits"] <= 3.1
    # the capacity counts scales and bit map: 2-bit codes with one fp16 scale per 64 cost 2.25+ bits
    assert 2.25 < results["static2"]["capacity"]["bits_per_element"] < 2.4
    arc = results["rule3"]["results"]["arc_easy"]
    assert arc["n"] == ARC_LIMIT and len(arc["acc"]) == ARC_LIMIT and arc["quantized_reads"] > 0
    table = (out / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| static2 |"))
    assert "x | 2.3" in row and "| 2.00 |" in row and "quantized reads" in table
    assert (out / "wikitext.png").stat().st_size > 0 and (out / "arc_easy.png").stat().st_size > 0


def test_eval_is_resumable(eval_dir):
    out, cmd = eval_dir
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr.count("reusing") == 3


def _lm_eval(adakv: dict | None) -> tuple[dict, str]:
    cmd = [sys.executable, "-m", "adakv_vllm.eval.lm_eval_client", "--limit", str(ARC_LIMIT)]
    if adakv is not None:
        cmd += ["--adakv", json.dumps(adakv)]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=KV_SPACE_GIB)
    env.pop("ADAKV_KV_CACHE_PLUGIN", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("LM-EVAL-RESULT "))
    return json.loads(line[len("LM-EVAL-RESULT ") :]), proc.stdout + proc.stderr  # vLLM logs to stdout


def test_lm_eval_agrees_with_adakv_eval_and_runs_the_plugin(eval_dir):
    out, _ = eval_dir
    ours = json.loads((out / "bf16.json").read_text())["results"]["arc_easy"]
    ours_acc = sum(ours["acc"]) / len(ours["acc"])
    theirs, _ = _lm_eval(None)
    assert abs(theirs["acc"] - ours_acc) <= theirs["acc_stderr"], (theirs, ours_acc)
    with_plugin, log = _lm_eval({"target_bits": 3, "policy": "rule"})
    assert "AdaKV active" in log  # the engine lm-eval built really ran the plugin
    assert 0.0 <= with_plugin["acc"] <= 1.0


def test_ray_scale_out_with_a_local_instance(tmp_path):
    """Configs run as Ray tasks (one engine process each); results land like a local run's."""
    pytest.importorskip("ray")
    cmd = [
        sys.executable, "-m", "adakv_vllm.engine.cli", "eval",
        "--tasks", "arc_easy", "--configs", "bf16,static4", "--limit", "8",
        "--out", str(tmp_path), "--kv-space-gib", KV_SPACE_GIB, "--ray-address", "local",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("done on Ray") == 2
    for name in ("bf16", "static4"):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["results"]["arc_easy"]["n"] == 8
