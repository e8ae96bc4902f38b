"""`adakv bench compare` end to end on tiny settings, plus its error paths (no engine needed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adakv_vllm.bench import compare
from adakv_vllm.engine import cli
from tests.e2e.conftest import KV_SPACE_GIB, ROOT

BATCH, CONTEXT, NEW_TOKENS = 2, 256, 8
POINT = f"{BATCH}x{CONTEXT}"
TINY = [
    "--num-prompts", "2", "--input-len", "64", "--output-len", "8", "--decode-points", POINT,
    "--decode-tokens", str(NEW_TOKENS), "--repeats", "1", "--enforce-eager", "--kv-space-gib", KV_SPACE_GIB,
]  # fmt: skip


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    cmd = [
        sys.executable, "-m", "adakv_vllm.engine.cli", "bench", "compare", "--configs", "bf16,adakv",
        *TINY, "--json", str(out / "compare.json"), "--plot", str(out / "compare.png"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "compare.json").read_text()), proc, out


def test_compare_measures_every_phase(compare_run):
    report, proc, out = compare_run
    settings = report["settings"]
    assert settings["engine_args"] == {"enforce_eager": True} and settings["kv_space_gib"] == KV_SPACE_GIB
    assert report["versions"]["vllm"] and report["cpu"]["cores"] >= 1 and "adakv_cpu_attention" in settings
    assert set(report["runs"]) == {"bf16", "adakv"}
    for name, rounds in report["runs"].items():
        assert len(rounds) == 1
        res = rounds[0]["error"] is None and rounds[0]["result"]
        assert res, f"{name} failed: {rounds[0]['error']}"
        assert res["phases_done"] == ["startup", "throughput", f"decode {POINT}"]
        engine = res["engine"]
        assert res["kv_capacity_tokens"] == engine["num_blocks"] * engine["block_size"] > 0
        assert res["peak_rss_mib"] > 0 and res["startup_s"] > 0
        tp = res["throughput"]
        assert tp["output_tokens"] == 2 * 8 and 0 < tp["output_tok_s"] < tp["total_tok_s"]
        cold, warm = res["decode"][POINT]["cold"], res["decode"][POINT]["warm"]
        for phase in (cold, warm):
            assert phase["ms_per_token"] > 0 and phase["ttft_ms"] > 0 and phase["wall_s"] > 0
            assert len(phase["per_request_ms_per_token"]) == BATCH
        # cold prompts were never seen; the warm re-run reads their full blocks from the prefix cache
        assert cold["cached_prompt_tokens"] == 0
        assert warm["cached_prompt_tokens"] == CONTEXT - engine["block_size"]
    # each engine at its own defaults: vLLM's CPU block size for stock, the plugin's for AdaKV
    assert report["runs"]["bf16"][0]["result"]["engine"]["block_size"] == 128
    assert report["runs"]["adakv"][0]["result"]["engine"]["block_size"] == 32
    ratios = report["ratios"]
    assert ratios["bf16"]["kv_tokens"]["median"] == 1.0 and ratios["adakv"]["kv_tokens"]["median"] > 3
    for key in ("throughput.output_tok_s", *(f"decode.{POINT}.{p}.ms_per_token" for p in ("cold", "warm"))):
        assert ratios["adakv"][key]["median"] > 0
    assert "| adakv | " in proc.stdout and f"Decode {BATCH} x {CONTEXT} tokens" in proc.stdout
    assert f"[round 1/1 2/2] [adakv] decode {POINT} warm" in proc.stderr
    assert (out / "compare.png").stat().st_size > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--configs", "bf16,adakv9x"], "unknown config 'adakv9x'"),
        (["--configs", "adakv1"], "target_bits must be"),
        (["--configs", "adakv5", "--policy", "static"], "policy 'static' needs"),
        (["--configs", "bf16,bf16"], "each config once"),
        (["--decode-points", "1x8190"], "8190 + 64 decode tokens > max_model_len 8192"),
        (["--decode-points", "16-8128"], "BATCHxCONTEXT"),
        (["--engine-arg", "kv_cache_dtype=fp8"], "kv_cache_dtype: the configs or the benchmark set"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_compare_rejects_bad_arguments(args, message, capsys, monkeypatch):
    no_engine = (sys.executable, "-c", "raise SystemExit('arguments that should fail started an engine')")
    monkeypatch.setattr(compare, "ENGINE_COMMAND", no_engine)
    assert cli.main(["bench", "compare", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_crashing_config_keeps_the_others(tmp_path, monkeypatch, capsys):
    """Fake engines: bf16 succeeds, fp8 writes its startup phase then dies; both are reported."""
    fake = tmp_path / "engine.py"
    fake.write_text(
        "import json, sys\n"
        "spec = json.loads(sys.argv[1])\n"
        "res = {'name': spec['name'], 'kv_capacity_tokens': 64, 'peak_rss_mib': 1.0}\n"
        "open(spec['output'], 'w').write(json.dumps(res))\n"
        "sys.exit(3 if spec['name'] == 'fp8' else 0)\n"
    )
    monkeypatch.setattr(compare, "ENGINE_COMMAND", (sys.executable, str(fake)))
    path = tmp_path / "out.json"
    rc = cli.main(["bench", "compare", "--configs", "bf16,fp8", "--repeats", "1", "--json", str(path)])
    assert rc == 1
    runs = json.loads(path.read_text())["runs"]
    assert runs["bf16"][0]["error"] is None and runs["fp8"][0]["error"].startswith("exit code 3")
    assert runs["fp8"][0]["result"]["kv_capacity_tokens"] == 64  # the phases done before the crash survive
    captured = capsys.readouterr()
    assert "| fp8 (FAILED 1/1) | 64 | 1.00 |" in captured.out and "failed configs: fp8" in captured.err
