"""`adakv bench compare` end to end on tiny settings, plus its error paths (no engine needed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adakv_vllm.bench import compare
from adakv_vllm.engine import cli
from tests.e2e.conftest import KV_SPACE_GIB, ROOT

CONTEXT, BATCHES = 256, (1, 2)
TINY = [
    "--contexts", str(CONTEXT), "--batch-sizes", ",".join(map(str, BATCHES)), "--decode-tokens", "8",
    "--num-prompts", "4", "--input-len", "64", "--output-len", "8",
    "--max-model-len", "1024", "--max-num-batched-tokens", "512", "--kv-space-gib", KV_SPACE_GIB,
]  # fmt: skip


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    cmd = [
        sys.executable, "-m", "adakv_vllm.engine.cli", "bench", "compare", "--configs", "bf16,adakv4",
        *TINY, "--json", str(out / "compare.json"), "--plot", str(out / "decode.png"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "compare.json").read_text()), proc, out


def test_compare_measures_every_config(compare_run):
    report, proc, out = compare_run
    assert set(report["runs"]) == {"bf16", "adakv4"}
    assert (
        report["settings"]["engine"]["block_size"] == 32
        and report["settings"]["kv_space_gib"] == KV_SPACE_GIB
    )
    assert (
        report["versions"]["vllm"]
        and report["cpu"]["cores"] >= 1
        and "adakv_cpu_attention" in report["settings"]
    )
    for name, run in report["runs"].items():
        res = run["error"] is None and run["result"]
        assert res, f"{name} failed: {run['error']}"
        assert res["kv_capacity_tokens"] == res["num_blocks"] * res["block_size"] > 0
        assert res["peak_rss_mib"] > 0
        tp = res["throughput"]
        assert tp["output_tokens"] == 4 * 8 and tp["output_tokens_per_s"] > 0 and tp["total_tokens_per_s"] > 0
        for batch in BATCHES:
            fig = res["decode"][str(CONTEXT)][str(batch)]
            assert fig["ms_per_token"] > 0 and len(fig["per_request_ms"]) == batch
            # the batch decoded together: every request got its first token in the same step
            assert fig["first_token_spread_ms"] == 0.0 and fig["cached_prompt_tokens"] >= CONTEXT - 32
            # one engine step per generated token after the first; CPU time per step is measured
            assert fig["steps"] == 8 - 1 and fig["step_cpu_ms_mean"] > 0 and fig["step_wall_ms_median"] > 0
    ratios = report["ratios"]
    assert ratios["bf16"]["kv_capacity"] == 1.0 and ratios["adakv4"]["kv_capacity"] >= 3
    assert ratios["adakv4"]["decode_ms_per_token"][str(CONTEXT)]["1"] > 0
    assert "| adakv4 |" in proc.stdout and f"b2 @ {CONTEXT}" in proc.stdout
    assert "[2/2] [adakv4] decode context 256 batch 2" in proc.stderr
    assert (out / "decode.png").stat().st_size > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--configs", "bf16,adakv9x"], "unknown config 'adakv9x'"),
        (["--configs", "adakv1"], "target_bits must be"),
        (["--configs", "adakv2.5", "--policy", "static"], "policy 'static' needs"),
        (
            ["--contexts", "1000", "--max-model-len", "1024"],
            "context 1000 + 64 decode tokens > max_model_len",
        ),
        (["--skip", "16-8128"], "BATCHxCONTEXT"),
    ],
)
def test_compare_rejects_bad_arguments(args, message, capsys):
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
    rc = cli.main(["bench", "compare", "--configs", "bf16,fp8", "--no-decode", "--json", str(path)])
    assert rc == 1
    runs = json.loads(path.read_text())["runs"]
    assert runs["bf16"]["error"] is None and runs["fp8"]["error"].startswith("exit code 3")
    assert runs["fp8"]["result"]["kv_capacity_tokens"] == 64  # the phases done before the crash survive
    captured = capsys.readouterr()
    assert "| fp8 (FAILED) |" in captured.out and "failed configs: fp8" in captured.err
