"""AdaKVConfig: defaults, validation with clear messages, environment switch."""

from __future__ import annotations

import pytest

from adakv_vllm.config import AdaKVConfig, requested_options


def test_defaults_valid():
    cfg = AdaKVConfig()
    assert cfg.target_bits == 3.5 and cfg.policy == "auto" and cfg.key_value_bits() == (4.0, 3.0)


@pytest.mark.parametrize(
    "target,split,expected",
    [(3.5, 1.0, (4.0, 3.0)), (3, 1.0, (3.5, 2.5)), (4, 0.0, (4.0, 4.0)), (2, 1.0, (2.0, 2.0)),
     (2.25, 1.0, (2.5, 2.0)), (16, 1.0, (16.0, 16.0)), (15.8, 1.0, (16.0, 15.6))],
)  # fmt: skip
def test_key_value_split_keeps_the_average_within_range(target, split, expected):
    k, v = AdaKVConfig(target_bits=target, key_value_split=split).key_value_bits()
    assert (k, v) == pytest.approx(expected) and (k + v) / 2 == pytest.approx(target)


def test_static_splits_only_where_both_parts_are_precisions():
    assert AdaKVConfig(policy="static", target_bits=8).key_value_bits() == (8.0, 8.0)
    assert AdaKVConfig(policy="static", target_bits=3.5).key_value_bits() == (4.0, 3.0)
    assert AdaKVConfig(policy="random", target_bits=8).key_value_bits() == (8.5, 7.5)


def test_group_size_follows_the_head_size():
    assert [AdaKVConfig().group_size_for(d) for d in (64, 80, 96, 128)] == [64, 16, 32, 64]
    assert AdaKVConfig(group_size=32).group_size_for(64) == 32


@pytest.mark.parametrize(
    "options,match",
    [
        ({"target_bits": 1}, r"\[2, 16\]"),
        ({"target_bits": 17}, r"\[2, 16\]"),
        ({"target_bits": "4"}, r"\[2, 16\]"),
        ({"policy": "learned-ish"}, "unknown policy"),
        ({"policy": "static", "target_bits": 3, "key_value_split": 1}, "static"),  # keys 3.5: no precision
        ({"key_value_split": -1}, "key_value_split"),
        ({"rotate_keys": True}, "unknown AdaKV option"),
        ({"group_size": 24}, "group_size"),
        ({"sink_tokens": -1}, "sink_tokens"),
        ({"bogus": 1}, "unknown AdaKV option"),
        # accepted once, then crashed at the first step or meant something else than the log said
        ({"target_bits": True}, "target_bits"),
        ({"target_bits": float("nan")}, "target_bits"),
        ({"seed": "7"}, "seed"),
        ({"seed": 7.0}, "seed"),
        ({"seed": False}, "seed"),
        ({"group_size": 32.0}, "group_size"),
        ({"sink_tokens": True}, "sink_tokens"),
        ({"sink_tokens": 4.0}, "sink_tokens"),
        ({"prompt_features": "yes"}, "prompt_features"),
    ],
)
def test_bad_options_rejected(options, match):
    with pytest.raises(ValueError, match=match):
        AdaKVConfig.from_options(options)


def test_not_requested(monkeypatch):
    monkeypatch.delenv("ADAKV_KV_CACHE_PLUGIN", raising=False)
    assert requested_options({}) is None
    assert requested_options({"other_plugin_key": 1}) is None


def test_requested_through_additional_config(monkeypatch):
    monkeypatch.delenv("ADAKV_KV_CACHE_PLUGIN", raising=False)
    opts = requested_options({"kv_cache_plugin": "adakv", "target_bits": 3, "someone_else": 1})
    assert opts == {"target_bits": 3}


def test_typo_of_ours_rejected(monkeypatch):
    monkeypatch.delenv("ADAKV_KV_CACHE_PLUGIN", raising=False)
    with pytest.raises(ValueError, match="unknown AdaKV option"):
        requested_options({"kv_cache_plugin": "adakv", "target_bit": 3, "key_bits": 2})


def test_other_plugin_name_rejected():
    with pytest.raises(ValueError, match="unknown kv_cache_plugin"):
        requested_options({"kv_cache_plugin": "kivi"})


def test_environment_switch(monkeypatch):
    monkeypatch.setenv("ADAKV_KV_CACHE_PLUGIN", "adakv")
    monkeypatch.setenv("ADAKV_OPTIONS", '{"target_bits": 3, "policy": "random"}')
    assert requested_options(None) == {"target_bits": 3, "policy": "random"}
    # additional_config wins key by key
    assert requested_options({"target_bits": 8})["target_bits"] == 8
    monkeypatch.setenv("ADAKV_OPTIONS", "[1]")
    with pytest.raises(ValueError, match="JSON object"):
        requested_options(None)
    monkeypatch.setenv("ADAKV_OPTIONS", "{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        requested_options(None)


@pytest.mark.parametrize(
    "explicit", [{"kv_cache_plugin": "none"}, {"kv_cache_plugin": "none", "target_bits": 3}]
)
def test_explicit_none_wins_over_environment(monkeypatch, explicit):
    monkeypatch.setenv("ADAKV_KV_CACHE_PLUGIN", "adakv")
    monkeypatch.setenv("ADAKV_OPTIONS", "{oops")  # never read while the plugin is off
    assert requested_options(explicit) is None


def test_explicit_adakv_wins_over_environment_none(monkeypatch):
    monkeypatch.setenv("ADAKV_KV_CACHE_PLUGIN", "none")
    monkeypatch.setenv("ADAKV_OPTIONS", '{"target_bits": 3}')
    assert requested_options(None) is None
    # ADAKV_OPTIONS belongs to ADAKV_KV_CACHE_PLUGIN=adakv; it does not leak into an explicit request
    assert requested_options({"kv_cache_plugin": "adakv", "policy": "rule"}) == {"policy": "rule"}


def test_bad_environment_plugin_named(monkeypatch):
    monkeypatch.setenv("ADAKV_KV_CACHE_PLUGIN", "kivi")
    with pytest.raises(ValueError, match="unknown ADAKV_KV_CACHE_PLUGIN 'kivi'"):
        requested_options(None)
    assert requested_options({"kv_cache_plugin": "adakv"}) == {}  # an explicit setting wins
