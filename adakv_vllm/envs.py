"""Every ADAKV_* environment variable, in one table. Read them through these functions only."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

# name -> (default, meaning)
ENV_VARS: dict[str, tuple[str | None, str]] = {
    "ADAKV_CACHE_DIR": (
        None,
        "folder for the converted embedded model and the compiled CPU library in ext/ (default: "
        "$XDG_CACHE_HOME/adakv or ~/.cache/adakv); the library is not used from a folder that another "
        "user owns or group/others can write",
    ),
    "ADAKV_KV_CACHE_PLUGIN": (
        None,
        "'adakv' switches the plugin on for engines whose additional_config names no kv_cache_plugin "
        "(lm-eval, notebooks); an explicit kv_cache_plugin ('adakv' or 'none') always wins",
    ),
    "ADAKV_OPTIONS": (
        None,
        "JSON object of AdaKV options, read only with ADAKV_KV_CACHE_PLUGIN=adakv while the plugin is on, "
        "e.g. '{\"target_bits\": 4}'",
    ),
    "ADAKV_CPU_ATTENTION": (
        "auto",
        "CPU decode attention: 'fused' (C++ kernel over packed pages; error if it cannot build), "
        "'scratch' (decode pages into a bf16 scratch, vLLM's kernel), 'auto' (fused when it builds)",
    ),
    "ADAKV_STATS_FILE": (
        None,
        "a path: the worker rewrites it (JSON, at most once a second and whenever staging empties) with "
        "staging use, peak and reserve, blocks sealed and requests sanitised (make soak reads it)",
    ),
    "ADAKV_TEST_POISON_TOKEN": (
        None,
        "TESTS ONLY: a token id; requests whose prompt holds it get NaN K/V cached (engine/faults.py)",
    ),
}

CPU_ATTENTION_MODES = ("auto", "fused", "scratch")
# The variables that can switch the plugin on in an engine that does not say so itself.
PLUGIN_SWITCH_VARS = ("ADAKV_KV_CACHE_PLUGIN", "ADAKV_OPTIONS")


def _get(name: str) -> str | None:
    return os.environ.get(name, ENV_VARS[name][0])


def cache_dir() -> Path:
    explicit = _get("ADAKV_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adakv"


def kv_cache_plugin() -> str | None:
    return _get("ADAKV_KV_CACHE_PLUGIN") or None


def options_json() -> str | None:
    return _get("ADAKV_OPTIONS") or None


def without_plugin_switch(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of `environ` for an engine process whose config states the plugin and its options
    itself (stock baselines included), so the caller's environment cannot change what it runs."""
    return {k: v for k, v in environ.items() if k not in PLUGIN_SWITCH_VARS}


def cpu_attention() -> str:
    mode = (_get("ADAKV_CPU_ATTENTION") or "auto").strip().lower()
    if mode not in CPU_ATTENTION_MODES:
        raise ValueError(f"ADAKV_CPU_ATTENTION must be one of {CPU_ATTENTION_MODES}, got {mode!r}")
    return mode


def test_poison_token() -> int | None:
    raw = _get("ADAKV_TEST_POISON_TOKEN")
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"ADAKV_TEST_POISON_TOKEN must be a token id (an integer), got {raw!r}") from None


def stats_file() -> str | None:
    return _get("ADAKV_STATS_FILE") or None
