"""Plugin activation through vLLM's own config path (no engine start): flags, errors, selection."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def engine_args(model_path):
    import adakv_vllm

    adakv_vllm.register()
    from vllm.engine.arg_utils import EngineArgs

    def make(**kwargs):
        defaults = dict(model=model_path, enforce_eager=True, max_model_len=512)
        return EngineArgs(**{**defaults, **kwargs})

    return make


def test_activation_selects_scheduler_worker_and_block(engine_args, monkeypatch):
    monkeypatch.delenv("ADAKV_KV_CACHE_PLUGIN", raising=False)
    cfg = engine_args(additional_config={"kv_cache_plugin": "adakv", "target_bits": 3}).create_engine_config()
    assert cfg.scheduler_config.scheduler_cls == "adakv_vllm.engine.scheduler.AdaKVScheduler"
    assert cfg.parallel_config.worker_cls == "adakv_vllm.engine.worker.AdaKVWorker"
    assert cfg.cache_config.block_size == 32


def test_stock_untouched(engine_args, monkeypatch):
    monkeypatch.delenv("ADAKV_KV_CACHE_PLUGIN", raising=False)
    cfg = engine_args().create_engine_config()
    assert cfg.scheduler_config.scheduler_cls in (None, "vllm.v1.core.sched.scheduler.Scheduler")
    assert "adakv" not in str(cfg.parallel_config.worker_cls)


def test_environment_switch_activates(engine_args, monkeypatch):
    monkeypatch.setenv("ADAKV_KV_CACHE_PLUGIN", "adakv")
    cfg = engine_args().create_engine_config()
    assert cfg.parallel_config.worker_cls == "adakv_vllm.engine.worker.AdaKVWorker"


def test_explicit_none_wins_over_environment(engine_args, monkeypatch):
    monkeypatch.setenv("ADAKV_KV_CACHE_PLUGIN", "adakv")
    monkeypatch.setenv("ADAKV_OPTIONS", '{"target_bits": 3}')
    cfg = engine_args(additional_config={"kv_cache_plugin": "none"}).create_engine_config()
    assert "adakv" not in str(cfg.parallel_config.worker_cls)
    assert cfg.scheduler_config.scheduler_cls in (None, "vllm.v1.core.sched.scheduler.Scheduler")


def test_cli_flag_none_wins_over_environment(model_path, monkeypatch):
    import adakv_vllm

    adakv_vllm.register()
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    monkeypatch.setenv("ADAKV_KV_CACHE_PLUGIN", "adakv")
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", model_path, "--max-model-len", "512", "--kv-cache-plugin", "none"])
    cfg = EngineArgs.from_cli_args(args).create_engine_config()
    assert "adakv" not in str(cfg.parallel_config.worker_cls)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"additional_config": {"kv_cache_plugin": "adakv", "policy": "nope"}}, "unknown policy"),
        ({"additional_config": {"kv_cache_plugin": "adakv", "target_bits": 1}}, r"\[2, 16\]"),
        ({"additional_config": {"kv_cache_plugin": "adakv"}, "kv_cache_dtype": "fp8"}, "kv_cache_dtype"),
        ({"additional_config": {"kv_cache_plugin": "other"}}, "unknown kv_cache_plugin"),
        ({"additional_config": {"kv_cache_plugin": "adakv"}, "scheduling_policy": "priority"}, "priority"),
        ({"additional_config": {"kv_cache_plugin": "adakv"}, "pipeline_parallel_size": 2}, "pipeline"),
        ({"additional_config": {"kv_cache_plugin": "adakv"}, "dtype": "float32"}, "bfloat16 or float16"),
        (
            {
                "additional_config": {"kv_cache_plugin": "adakv"},
                "kv_transfer_config": {"kv_connector": "OffloadingConnector", "kv_role": "kv_both"},
            },
            "KV connectors",
        ),
        # the shipped controller does not fit: auto chooses rule; but named weights must load
        (
            {
                "additional_config": {
                    "kv_cache_plugin": "adakv",
                    "controller_weights": "/nonexistent.safetensors",
                }
            },
            "nonexistent.safetensors",
        ),
    ],
)
def test_bad_options_fail_at_start(engine_args, monkeypatch, kwargs, match):
    monkeypatch.delenv("ADAKV_KV_CACHE_PLUGIN", raising=False)
    with pytest.raises(Exception, match=match):
        engine_args(**kwargs).create_engine_config()


def test_cli_flag_folds_into_additional_config(monkeypatch):
    import adakv_vllm

    adakv_vllm.register()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(
        ["--model", "m", "--kv-cache-plugin", "adakv", "--additional-config", '{"target_bits": 3}']
    )
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.additional_config == {"target_bits": 3, "kv_cache_plugin": "adakv"}
    off = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m", "--kv-cache-plugin", "none"]))
    assert off.additional_config == {"kv_cache_plugin": "none"}  # explicit: the environment cannot undo it
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--kv-cache-plugin", "kivi"])
