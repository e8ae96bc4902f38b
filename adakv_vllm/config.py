"""One frozen AdaKVConfig: every user option, validated at the boundary.

Options come from vLLM's `additional_config` (`LLM(..., additional_config={...})`,
`--additional-config '{...}'`, `--kv-cache-plugin adakv`) or, for clients that build `LLM(...)`
themselves, from the environment (`ADAKV_KV_CACHE_PLUGIN=adakv`, `ADAKV_OPTIONS='{"target_bits": 4}'`).

Precedence: a `kv_cache_plugin` in `additional_config` ("adakv", or "none" = stock vLLM) always wins
over ADAKV_KV_CACHE_PLUGIN; without one, the environment decides. ADAKV_OPTIONS is read only when
ADAKV_KV_CACHE_PLUGIN=adakv and the plugin ends up on; `additional_config` keys win over it, key by key.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from adakv_vllm import envs
from adakv_vllm.quant.format import SUPPORTED_GROUP_SIZES
from adakv_vllm.quant.precision import ALL_BITS

PLUGIN_NAME = "adakv"
PLUGIN_OFF = "none"  # an explicit "stock vLLM", which the environment cannot override
PLUGIN_KEY = "kv_cache_plugin"
PLUGIN_VALUES = (PLUGIN_NAME, PLUGIN_OFF)
POLICIES = ("auto", "static", "random", "attention", "rule", "learned")
# key bits - value bits by default: keys need the bits more than values (benchmarks/quant_levers.py:
# K4/V3 beats K3/V4 and, at the same bytes, K3.5/V2.5 beats K3/V3)
DEFAULT_KEY_VALUE_SPLIT = 1.0


@dataclasses.dataclass(frozen=True)
class AdaKVConfig:
    # Average bits per cached element (keys and values together) that each page's byte budget
    # grants, 2..16, fractions allowed; scales and the bit map are paid on top (see the startup log).
    target_bits: float = 3.5
    # How many more bits keys get than values within target_bits (0 = the same budget for both).
    # None = 1, except for `static` where target_bits +- 0.5 are not both precisions (static 8: all 8).
    key_value_split: float | None = None
    # Which tokens get which bits inside the budget: static | random | attention | rule | learned;
    # auto = attention (the attention each token receives inside its own open block).
    policy: str = "auto"
    # Channels per quantization group (one fp16 scale each); None = the largest of 64, 32, 16 that
    # divides the model's head size.
    group_size: int | None = None
    # Leading tokens of every sequence that the rule policy grants 8 bits first (attention sinks).
    sink_tokens: int = 4
    # Seed of the random policy; decisions are a function of (seed, block content) for prefix caching.
    seed: int = 0
    # The learned policy's weights (.safetensors); None = the weights shipped for SmolLM2-135M.
    controller_weights: str | None = None
    # Compute logits at every prompt position so prompt tokens also get the entropy / confidence
    # features (generated tokens always have them). Costs one vocabulary projection per prompt token.
    prompt_features: bool = False
    # Share of the KV memory budget kept as FP16 staging for blocks not sealed yet (the open tails).
    # The scheduler admits requests and sizes prefill chunks to fit it; more staging admits more
    # concurrent requests, less leaves more tokens in pages (the startup log states both).
    staging_fraction: float = 0.04

    def __post_init__(self) -> None:
        # Types are checked strictly (JSON and YAML hand us strings, floats and booleans where an
        # int was meant): a value accepted here must mean what the startup log says it means.
        if not _is_number(self.target_bits) or not 2 <= self.target_bits <= 16:
            raise ValueError(f"target_bits must be a number within [2, 16], got {self.target_bits!r}")
        if self.key_value_split is not None and (
            not _is_number(self.key_value_split) or not 0 <= self.key_value_split <= 14
        ):
            raise ValueError(f"key_value_split must be a number within [0, 14], got {self.key_value_split!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {POLICIES}")
        if self.policy == "static" and not set(self.key_value_bits()) <= set(ALL_BITS):
            raise ValueError(
                f"policy 'static' needs key and value bits in {ALL_BITS}; target_bits {self.target_bits} "
                f"with key_value_split {self.split()} gives {self.key_value_bits()}"
            )
        if self.group_size is not None and (
            not _is_int(self.group_size) or self.group_size not in SUPPORTED_GROUP_SIZES
        ):
            raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {self.group_size!r}")
        if not _is_int(self.sink_tokens) or self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be a non-negative integer, got {self.sink_tokens!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.prompt_features, bool):
            raise ValueError(f"prompt_features must be true or false, got {self.prompt_features!r}")
        if not _is_number(self.staging_fraction) or not 0 < self.staging_fraction < 0.5:
            raise ValueError(f"staging_fraction must be a number in (0, 0.5), got {self.staging_fraction!r}")
        if self.controller_weights is not None and not isinstance(self.controller_weights, str):
            raise ValueError(f"controller_weights must be a file path, got {self.controller_weights!r}")

    def split(self) -> float:
        """key_value_split with its default resolved."""
        if self.key_value_split is not None:
            return float(self.key_value_split)
        half = DEFAULT_KEY_VALUE_SPLIT / 2
        parts = {self.target_bits + half, self.target_bits - half}
        if self.policy == "static" and not parts <= set(ALL_BITS):
            return 0.0
        return DEFAULT_KEY_VALUE_SPLIT

    def key_value_bits(self) -> tuple[float, float]:
        """(key bits, value bits) the page budget grants: target_bits +- split / 2, kept within
        [2, 16] with the same average."""
        t = float(self.target_bits)
        key = min(16.0, t + self.split() / 2)
        value = 2 * t - key
        if value < 2:
            value, key = 2.0, 2 * t - 2
        return key, value

    def group_size_for(self, head_size: int) -> int:
        if self.group_size is not None:
            return self.group_size
        return next(g for g in (64, 32, 16) if head_size % g == 0)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> AdaKVConfig:
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(f"unknown AdaKV option(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**options)

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def requested_options(additional_config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The AdaKV options asked for, or None when the plugin is not asked for.

    additional_config: vLLM's dict. Keys other than ours belong to other plugins and are ignored,
    except that a kv_cache_plugin other than "adakv" / "none" is an error.
    """
    explicit = dict(additional_config or {})
    env_plugin = envs.kv_cache_plugin()
    if PLUGIN_KEY in explicit:
        plugin, source = explicit[PLUGIN_KEY], "kv_cache_plugin"
    else:
        plugin, source = env_plugin, "ADAKV_KV_CACHE_PLUGIN"
    if plugin is not None and plugin not in PLUGIN_VALUES:
        raise ValueError(
            f"unknown {source} {plugin!r}; choose {PLUGIN_NAME!r} or {PLUGIN_OFF!r} (stock vLLM)"
        )
    if plugin in (None, PLUGIN_OFF):
        return None
    merged = _env_options() if env_plugin == PLUGIN_NAME else {}
    merged.update(explicit)
    field_names = {f.name for f in dataclasses.fields(AdaKVConfig)}
    options = {k: v for k, v in merged.items() if k in field_names}
    # Our keys are namespaced by being next to kv_cache_plugin; flag near-misses loudly.
    typos = [k for k in merged if k not in field_names and k != PLUGIN_KEY and _looks_like_ours(k)]
    if typos:
        raise ValueError(f"unknown AdaKV option(s) {typos}; allowed: {sorted(field_names)}")
    return options


def _looks_like_ours(key: str) -> bool:
    return key.endswith("_bits") or key in ("bits", "policies", "group", "rotate", "sinks")


def _env_options() -> dict[str, Any]:
    raw = envs.options_json()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"ADAKV_OPTIONS is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("ADAKV_OPTIONS must be a JSON object, e.g. '{\"target_bits\": 4}'")
    return value


def from_vllm_config(vllm_config) -> AdaKVConfig | None:
    """AdaKVConfig for this engine, or None when the plugin is not asked for."""
    options = requested_options(getattr(vllm_config, "additional_config", None))
    return None if options is None else AdaKVConfig.from_options(options)
