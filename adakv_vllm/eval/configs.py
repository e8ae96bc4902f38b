"""The evaluation configs: stock baselines and AdaKV policies at matched budgets."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    name: str
    adakv: dict | None  # AdaKV options, None = stock vLLM
    kv_cache_dtype: str = "auto"
    nominal_bits: float = 16.0

    def llm_kwargs(self) -> dict:
        kwargs: dict = {"kv_cache_dtype": self.kv_cache_dtype}
        if self.adakv is not None:
            kwargs["additional_config"] = {"kv_cache_plugin": "adakv", **self.adakv}
        return kwargs


def _adakv(name: str, policy: str, bits: float) -> EvalConfig:
    return EvalConfig(name, {"target_bits": bits, "policy": policy}, nominal_bits=bits)


CONFIGS: dict[str, EvalConfig] = {
    c.name: c
    for c in [
        EvalConfig("bf16", None),
        EvalConfig("fp8", None, kv_cache_dtype="fp8", nominal_bits=8),
        _adakv("static8", "static", 8),
        _adakv("static4", "static", 4),
        _adakv("static2", "static", 2),
        _adakv("random3", "random", 3),
        _adakv("random4", "random", 4),
        _adakv("rule3", "rule", 3),
        _adakv("rule4", "rule", 4),
    ]
}
DEFAULT_CONFIGS = tuple(CONFIGS)
REFERENCE = "bf16"


def parse_configs(names: str) -> list[EvalConfig]:
    out = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in CONFIGS:
            raise ValueError(f"unknown config {name!r}; choose from {sorted(CONFIGS)}")
        out.append(CONFIGS[name])
    return out
