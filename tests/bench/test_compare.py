"""`adakv bench compare` without an engine: what each config's engine process is given (every config at
its own defaults, the user's settings for all alike), the round order, and the report's figures."""

from __future__ import annotations

import json
import sys

import pytest

from adakv_vllm.bench import compare, compare_report, figures

# A stand-in engine: writes its spec and the environment variables the test checks, then exits.
FAKE_ENGINE = """
import json, os, sys
spec = json.loads(sys.argv[1])
env = {k: v for k, v in os.environ.items() if k.startswith(("ADAKV_", "VLLM_"))}
open(spec["output"], "w").write(json.dumps({"spec": spec, "env": env}))
with open(os.environ["FAKE_ENGINE_LOG"], "a") as log:
    log.write(spec["name"] + "\\n")
"""


@pytest.fixture
def fake_engine(tmp_path, monkeypatch):
    script = tmp_path / "engine.py"
    script.write_text(FAKE_ENGINE)
    monkeypatch.setattr(compare, "ENGINE_COMMAND", (sys.executable, str(script)))
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(tmp_path / "order.log"))
    return tmp_path / "order.log"


def settings_for(*argv: str) -> dict:
    return compare.make_settings(compare.build_parser().parse_args(list(argv)))


def spec_of(name: str, settings: dict) -> dict:
    args = compare.build_parser().parse_args([])
    record = compare.run_config(compare.resolve_config(name), settings, "[1/1]", args)
    assert record["error"] is None, record["error"]
    return record["result"]


# ---- every config at its own defaults ----------------------------------------------------------------
STOCK_DEFAULTS_OWNED_BY_VLLM = (
    "block_size", "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching", "enforce_eager",
    "gpu_memory_utilization", "max_model_len",
)  # fmt: skip


@pytest.mark.parametrize("name", ["bf16", "fp8", "adakv"])
def test_every_config_runs_at_its_own_defaults(name, fake_engine):
    """Without user settings, the engine gets no engine argument at all: only the config's own
    keywords (stock: kv_cache_dtype and kv_cache_plugin "none"; adakv: the plugin switch only)."""
    result = spec_of(name, settings_for())
    spec = result["spec"]
    assert spec["engine_args"] == {}
    expected = {
        "bf16": {"kv_cache_dtype": "auto", "additional_config": {"kv_cache_plugin": "none"}},
        "fp8": {"kv_cache_dtype": "fp8", "additional_config": {"kv_cache_plugin": "none"}},
        "adakv": {"kv_cache_dtype": "auto", "additional_config": {"kv_cache_plugin": "adakv"}},
    }[name]
    assert spec["llm_kwargs"] == expected
    passed = {**spec["engine_args"], **spec["llm_kwargs"], **spec["llm_kwargs"]["additional_config"]}
    assert not set(passed) & set(STOCK_DEFAULTS_OWNED_BY_VLLM)
    assert result["env"]["VLLM_CPU_KVCACHE_SPACE"] == "4"


def test_user_settings_apply_to_every_config_alike(fake_engine):
    settings = settings_for(
        "--engine-arg", "max_model_len=4096", "--engine-arg", "enable-prefix-caching=false",
        "--engine-arg", "compilation_config={\"mode\": 0}", "--enforce-eager", "--kv-space-gib", "1",
    )  # fmt: skip
    engine_args = {
        "max_model_len": 4096,
        "enable_prefix_caching": False,
        "compilation_config": {"mode": 0},
        "enforce_eager": True,
    }
    for name in ("bf16", "adakv4"):
        result = spec_of(name, settings)
        assert result["spec"]["engine_args"] == engine_args
        assert result["env"]["VLLM_CPU_KVCACHE_SPACE"] == "1"


@pytest.mark.parametrize("name", ["bf16", "fp8", "adakv4"])
def test_engine_process_gets_no_plugin_switch(name, fake_engine, monkeypatch):
    """The config alone decides stock or AdaKV: the caller's ADAKV_KV_CACHE_PLUGIN / ADAKV_OPTIONS
    reach no engine, and the stock baselines say kv_cache_plugin "none" explicitly."""
    monkeypatch.setenv("ADAKV_KV_CACHE_PLUGIN", "adakv")
    monkeypatch.setenv("ADAKV_OPTIONS", '{"target_bits": 2}')
    result = spec_of(name, settings_for())
    assert "ADAKV_KV_CACHE_PLUGIN" not in result["env"] and "ADAKV_OPTIONS" not in result["env"]
    plugin = result["spec"]["llm_kwargs"]["additional_config"]["kv_cache_plugin"]
    assert plugin == ("adakv" if name.startswith("adakv") else "none")


def test_config_names():
    assert compare.resolve_config("adakv").adakv == {}  # the plugin's defaults, nothing chosen for it
    assert compare.resolve_config("adakv4").adakv == {"target_bits": 4.0}
    assert compare.resolve_config("adakv2.5", "rule").adakv == {"target_bits": 2.5, "policy": "rule"}
    assert compare.resolve_config("static4").name == "static4"  # eval/configs.py's names
    with pytest.raises(ValueError, match="unknown config 'adakvx'"):
        compare.resolve_config("adakvx")


@pytest.mark.parametrize(
    "items, expected",
    [
        (["block_size=64"], {"block_size": 64}),
        (["--max-num-seqs=8", "dtype=bfloat16"], {"max_num_seqs": 8, "dtype": "bfloat16"}),
        (["enforce_eager=true", "seed=null"], {"enforce_eager": True, "seed": None}),
    ],
)
def test_parse_engine_args(items, expected):
    assert compare.parse_engine_args(items) == expected


@pytest.mark.parametrize(
    "items, message",
    [
        (["block_size"], "KEY=VALUE"),
        (["1x=2"], "KEY=VALUE"),
        (["kv_cache_dtype=fp8"], "kv_cache_dtype: the configs or the benchmark set"),
        (["additional-config={}"], "additional_config: the configs"),
    ],
)
def test_parse_engine_args_rejects(items, message):
    with pytest.raises(ValueError, match=message):
        compare.parse_engine_args(items)


def test_decode_points():
    assert compare.parse_points("8x2048, 1x4096") == [(8, 2048), (1, 4096)]
    for bad in ("8-2048", "0x128", "8x", "2x128,2x128"):
        with pytest.raises(ValueError):
            compare.parse_points(bad)
    with pytest.raises(ValueError, match="4050 \\+ 64 decode tokens > max_model_len 4096"):
        settings_for("--decode-points", "1x4050", "--engine-arg", "max_model_len=4096")
    with pytest.raises(ValueError, match="max_model_len 8192"):  # the model's own limit
        settings_for("--decode-points", "1x8192")


def test_rounds_alternate_the_config_order(fake_engine, tmp_path, capsys):
    """Round 1 runs A B C, round 2 C B A, round 3 A B C; each run is a fresh engine process."""
    rc = compare.main(["--configs", "bf16,fp8,adakv", "--repeats", "3", "--json", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    forward, backward = ["bf16", "fp8", "adakv"], ["adakv", "fp8", "bf16"]
    assert fake_engine.read_text().split() == forward + backward + forward
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert [r["position"] for r in runs["bf16"]] == [1, 3, 1]
    assert [r["round"] for r in runs["adakv"]] == [1, 2, 3]


# ---- figures, ratios and the table -------------------------------------------------------------------
def test_summaries_and_ratio_orientation():
    s = figures.summarize([3.0, None, 1.0, 2.0])
    assert (s["min"], s["median"], s["max"], s["n"]) == (1.0, 2.0, 3.0, 3)
    assert figures.summarize([None]) is None
    # x > 1 is better both ways: twice the tokens/s, or half the ms
    assert figures.ratio(200.0, 100.0, figures.HIGHER) == 2.0
    assert figures.ratio(50.0, 100.0, figures.LOWER) == 2.0
    assert figures.ratio(None, 100.0, figures.LOWER) is None
    assert figures.ratio(1.0, 0.0, figures.HIGHER) is None
    with pytest.raises(ValueError, match="better must be"):
        figures.ratio(1.0, 1.0, "faster")


def _result(kv: int, tok_s: float, cold_ms: float, warm_ms: float) -> dict:
    phase = {"ms_per_token": cold_ms, "wall_s": 2.0, "ttft_ms": 100.0}
    return {
        "kv_capacity_tokens": kv,
        "peak_rss_mib": 1000.0,
        "startup_s": 30.0,
        "engine": {"block_size": 128 if kv < 1000 else 32, "max_num_seqs": 256},
        "throughput": {"output_tok_s": tok_s, "total_tok_s": 5 * tok_s},
        "decode": {"2x128": {"cold": phase, "warm": {**phase, "ms_per_token": warm_ms}}},
    }


def _round(result: dict | None, error: str | None = None) -> dict:
    return {"result": result, "error": error}


def test_report_ratios_and_table():
    runs = {
        "bf16": [_round(_result(512, 100.0, 40.0, 30.0)), _round(_result(512, 120.0, 60.0, 30.0))],
        "adakv": [_round(_result(2048, 90.0, 80.0, 30.0)), _round(None, "exit code 1; ...")],
    }
    summary = compare_report.summarize_runs(runs)
    assert summary["bf16"]["throughput.output_tok_s"]["median"] == 110.0
    assert summary["adakv"]["decode.2x128.cold.ms_per_token"]["n"] == 1  # the failed round measured nothing
    rat = compare_report.ratio_table(summary)
    assert rat["bf16"]["kv_tokens"]["median"] == 1.0
    assert rat["adakv"]["kv_tokens"]["median"] == 4.0  # more capacity: > 1
    assert rat["adakv"]["decode.2x128.cold.ms_per_token"]["median"] == 50.0 / 80.0  # slower: < 1
    assert rat["adakv"]["throughput.output_tok_s"]["best"] == 90.0 / 120.0
    settings = {
        "model": "m", "kv_space_gib": "4", "engine_args": {}, "repeats": 2, "adakv_cpu_attention": None,
        "set_for_every_config": list(compare.SET_FOR_EVERY_CONFIG),
        "throughput": {"num_prompts": 2, "input_len": 64, "output_len": 8},
        "decode": {"points": [(2, 128)], "tokens": 8},
    }  # fmt: skip
    text = compare_report.table(runs, summary, rat, settings)
    assert "user engine args: none" in text and "VLLM_CPU_KVCACHE_SPACE=4 GiB" in text
    assert "| bf16 | 128 | 256 |" in text and "| adakv | 32 | 256 |" in text  # each engine's own settings
    assert "| bf16 | 512 | 1.00 | 1,000 | 1.00 | 30 | 1.00 | 110.0 (100.0) | 1.00 |" in text
    assert "| adakv (FAILED 1/2) | 2,048 | 4.00 |" in text
    assert "| cold ms/token | x |" in text and "50.0 (40.0) | 1.00" in text and "80.0 | 0.62" in text
    assert compare_report.ratio_table({"adakv": summary["adakv"]}) == {}  # no bf16, no ratios
