"""`adakv bench compare` without an engine: what each config's engine process is given."""

from __future__ import annotations

import json
import sys

import pytest

from adakv_vllm.bench import compare

# A stand-in engine: writes the parts of its spec and environment the test checks, then exits.
FAKE_ENGINE = """
import json, os, sys
spec = json.loads(sys.argv[1])
env = {k: v for k, v in os.environ.items() if k.startswith(("ADAKV_", "VLLM_"))}
open(spec["output"], "w").write(json.dumps({"llm_kwargs": spec["llm_kwargs"], "env": env}))
"""


@pytest.fixture
def fake_engine(tmp_path, monkeypatch):
    script = tmp_path / "engine.py"
    script.write_text(FAKE_ENGINE)
    monkeypatch.setattr(compare, "ENGINE_COMMAND", (sys.executable, str(script)))


SETTINGS = {"model": "m", "engine": {}, "seed": 0, "throughput": None, "decode": None, "kv_space_gib": "1"}


@pytest.mark.parametrize("name", ["bf16", "fp8", "adakv4"])
def test_engine_process_gets_no_plugin_switch(name, fake_engine, monkeypatch):
    """The config alone decides stock or AdaKV: the caller's ADAKV_KV_CACHE_PLUGIN / ADAKV_OPTIONS
    reach no engine, and the stock baselines say kv_cache_plugin "none" explicitly."""
    monkeypatch.setenv("ADAKV_KV_CACHE_PLUGIN", "adakv")
    monkeypatch.setenv("ADAKV_OPTIONS", '{"target_bits": 2}')
    args = compare.build_parser().parse_args([])
    record = compare.run_config(compare.resolve_config(name, "rule"), SETTINGS, "[1/1]", args)
    assert record["error"] is None, record["error"]
    result = record["result"]
    assert "ADAKV_KV_CACHE_PLUGIN" not in result["env"] and "ADAKV_OPTIONS" not in result["env"]
    assert result["env"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    plugin = result["llm_kwargs"]["additional_config"]["kv_cache_plugin"]
    assert plugin == ("adakv" if name.startswith("adakv") else "none")
    assert json.dumps(record["llm_kwargs"]) == json.dumps(result["llm_kwargs"])
