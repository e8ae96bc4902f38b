"""serve_sweep without vLLM: parsing the client's result JSON, the client's flags through vLLM's own
parser, the report, and the whole sweep against a stand-in `adakv` CLI (a tiny HTTP server and client)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import psutil
import pytest

from adakv_vllm.bench import serve_sweep
from adakv_vllm.engine.cli import vllm_argv

# Saved from a real `adakv bench serve ... --metric-percentiles 50,99 --save-result` (vLLM 0.32).
RESULT = json.loads((Path(__file__).parent / "data" / "vllm_bench_serve_result.json").read_text())


def test_parse_result_of_vllms_client():
    figs = serve_sweep.parse_result(RESULT)
    assert figs["request_throughput"] == pytest.approx(6.6693972735316445)
    assert figs["output_tok_s"] == pytest.approx(53.355178188253156)
    assert figs["ttft_p50_ms"] == RESULT["p50_ttft_ms"] and figs["ttft_p99_ms"] == RESULT["p99_ttft_ms"]
    assert figs["itl_p50_ms"] == RESULT["p50_itl_ms"] and figs["itl_p99_ms"] == RESULT["p99_itl_ms"]
    assert figs["completed"] == 4 and figs["failed"] == 0


def test_parse_result_needs_the_p50_percentiles():
    """vLLM's default --metric-percentiles is 99 alone: no p50 keys."""
    without = {k: v for k, v in RESULT.items() if not k.startswith("p50_")}
    with pytest.raises(ValueError, match="--metric-percentiles 50,99"):
        serve_sweep.parse_result(without)


def test_parse_rates():
    assert serve_sweep.parse_rates("1, 2.5,inf") == [1.0, 2.5, math.inf]
    assert [serve_sweep.rate_name(r) for r in serve_sweep.parse_rates("1,2.5,inf")] == ["1", "2.5", "inf"]
    for bad in ("0", "-1", "fast", "1,1", ""):
        with pytest.raises(ValueError, match="--rates"):
            serve_sweep.parse_rates(bad)


def test_client_command_through_vllms_parser(tmp_path):
    """The flags exist in vLLM 0.32's `bench serve`, and the CLI adds no engine flag to a client."""
    pytest.importorskip("vllm")
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = serve_sweep.build_parser().parse_args(["--input-len", "64", "--output-len", "8"])
    cmd = serve_sweep.client_command(8123, math.inf, 7, 5, args, tmp_path / "r.json")
    cli_args = cmd[len(serve_sweep.CLI) :]
    assert vllm_argv(cli_args) == cli_args
    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    parsed = parser.parse_args(cli_args[2:])
    assert (parsed.port, parsed.seed, parsed.num_prompts, parsed.request_rate) == (8123, 7, 5, math.inf)
    assert (parsed.random_input_len, parsed.random_output_len, parsed.dataset_name) == (64, 8, "random")
    assert parsed.ignore_eos and parsed.save_result and parsed.metric_percentiles == "50,99"
    assert Path(parsed.result_dir, parsed.result_filename) == tmp_path / "r.json"
    assert "itl" in parsed.percentile_metrics.split(",") and parsed.model is None  # the server's model


def _record(error=None, **rates) -> dict:
    return {"error": error, "kv_capacity_tokens": 1000, "startup_s": 1.0, "peak_rss_mib": 5.0, "rates": rates}


def _figs(req_s: float, ttft: float) -> dict:
    figs = {"request_throughput": req_s, "output_tok_s": 8 * req_s, "ttft_p50_ms": ttft}
    return {**figs, "ttft_p99_ms": 2 * ttft, "itl_p50_ms": 40.0, "itl_p99_ms": 80.0, "failed": 0}


def test_report_and_ratios_against_stock():
    runs = {
        "stock": [_record(**{"1": _figs(1.0, 100.0), "inf": _figs(4.0, 400.0)})],
        "adakv": [_record(**{"1": _figs(1.0, 50.0), "inf": {"error": "client exit code 1"}})],
    }
    summary = serve_sweep.summarize_runs(runs, ["1", "inf"])
    rat = serve_sweep.ratio_table(summary)
    assert rat["adakv"]["1"]["ttft_p50_ms"]["median"] == 2.0  # half the TTFT: x = 2, better
    assert rat["adakv"]["1"]["request_throughput"]["median"] == 1.0
    assert rat["adakv"]["inf"]["output_tok_s"] is None  # the lost run has no figure
    settings = {
        "kv_space_gib": "4", "server_args": [], "num_prompts": 8, "input_len": 64, "output_len": 8,
        "repeats": 1, "rates": ["1", "inf"],
    }  # fmt: skip
    text = serve_sweep.table(summary, rat, runs, settings)
    assert "| 1 | adakv | 1.00 | 1.00 | 8.0 | 1.00 | 50 | 2.00 |" in text
    assert "| inf | adakv | - | - |" in text and "0 (1 runs lost)" in text
    assert serve_sweep._lost(_record(error="server exited"), "1")


# A stand-in for `python -m adakv_vllm.engine.cli`: `serve` answers /health and logs a KV capacity;
# `bench serve` writes a result like vLLM's. Both append what they were asked to FAKE_LOG.
FAKE_CLI = """
import http.server, json, os, sys
argv = sys.argv[1:]
log = open(os.environ["FAKE_LOG"], "a")
if argv[0] == "serve":
    stock = "--kv-cache-plugin" in argv
    log.write(json.dumps({"serve": "stock" if stock else "adakv", "pid": os.getpid()}) + "\\n")
    log.close()
    if not stock and os.environ.get("FAKE_ADAKV_FAILS"):
        sys.exit(1)
    print("INFO CPU KV cache size: %s tokens" % ("1,024" if stock else "4,096"), flush=True)
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
        def log_message(self, *args):
            pass
    port = int(argv[argv.index("--port") + 1])
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
else:
    get = lambda flag: argv[argv.index(flag) + 1]
    log.write(json.dumps({"client": [get("--request-rate"), get("--seed"), get("--num-prompts")]}) + "\\n")
    result = json.loads(os.environ["FAKE_RESULT"])
    with open(os.path.join(get("--result-dir"), get("--result-filename")), "w") as f:
        json.dump(result, f)
"""


@pytest.fixture
def fake_cli(tmp_path, monkeypatch):
    script = tmp_path / "fake_cli.py"
    script.write_text(FAKE_CLI)
    monkeypatch.setattr(serve_sweep, "CLI", (sys.executable, str(script)))
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.log"))
    monkeypatch.setenv("FAKE_RESULT", json.dumps(RESULT))

    def calls() -> list[dict]:
        return [json.loads(line) for line in (tmp_path / "calls.log").read_text().splitlines()]

    return calls


def test_sweep_alternates_servers_and_stops_them(fake_cli, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    argv = ["--rates", "1,inf", "--num-prompts", "3", "--warmup-prompts", "2", "--repeats", "2"]
    assert serve_sweep.main([*argv, "--json", str(out)]) == 0, capsys.readouterr().err
    calls = fake_cli()
    assert [c["serve"] for c in calls if "serve" in c] == ["stock", "adakv", "adakv", "stock"]
    # per server: the warm-up (its own seed, --warmup-prompts requests), then one call per rate, seeds
    # 0 and 1 for every server: both configs get the same prompts, and no rate repeats another's
    per_server = [["inf", "2", "2"], ["1", "0", "3"], ["inf", "1", "3"]]
    assert [c["client"] for c in calls if "client" in c] == per_server * 4
    assert not any(psutil.pid_exists(c["pid"]) for c in calls if "pid" in c)  # every server stopped
    report = json.loads(out.read_text())
    stock, adakv = report["runs"]["stock"], report["runs"]["adakv"]
    assert [r["round"] for r in stock] == [1, 2] and stock[0]["kv_capacity_tokens"] == 1024
    assert adakv[0]["kv_capacity_tokens"] == 4096 and adakv[0]["error"] is None
    assert report["ratios"]["adakv"]["inf"]["request_throughput"]["median"] == 1.0
    assert report["summary"]["stock"]["1"]["itl_p99_ms"]["n"] == 2
    captured = capsys.readouterr()
    assert "| inf | adakv |" in captured.out and "[round 2/2 1/2] adakv: rate inf:" in captured.err


def test_a_server_that_fails_to_start_keeps_the_other(fake_cli, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_ADAKV_FAILS", "1")
    out = tmp_path / "sweep.json"
    assert serve_sweep.main(["--rates", "inf", "--warmup-prompts", "0", "--json", str(out)]) == 1
    runs = json.loads(out.read_text())["runs"]
    assert runs["stock"][0]["error"] is None and runs["stock"][0]["rates"]["inf"]["completed"] == 4
    assert runs["adakv"][0]["error"].startswith("server exited with 1")
    captured = capsys.readouterr()
    assert "| adakv (FAILED 1/1) |" in captured.out and "configs with lost runs: adakv" in captured.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--configs", "stock,fp8"], "--configs takes each of"),
        (["--rates", "0"], "--rates takes positive numbers"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    assert serve_sweep.main(argv) == 2
    assert message in capsys.readouterr().err
