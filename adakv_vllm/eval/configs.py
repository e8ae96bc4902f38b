"""The evaluation configs: stock baselines and AdaKV policies at matched budgets."""

from __future__ import annotations

import dataclasses

from adakv_vllm.config import PLUGIN_KEY, PLUGIN_NAME, PLUGIN_OFF


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    name: str
    adakv: dict | None  # AdaKV options, None = stock vLLM
    kv_cache_dtype: str = "auto"
    nominal_bits: float = 16.0

    def llm_kwargs(self) -> dict:
        """LLM(...) keywords. Stock configs say kv_cache_plugin "none" explicitly, so that
        ADAKV_KV_CACHE_PLUGIN in the environment can never turn a baseline into AdaKV."""
        if self.adakv is None:
            extra = {PLUGIN_KEY: PLUGIN_OFF}
        else:
            extra = {PLUGIN_KEY: PLUGIN_NAME, **self.adakv}
        return {"kv_cache_dtype": self.kv_cache_dtype, "additional_config": extra}


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
        _adakv("learned3", "learned", 3),
        _adakv("learned4", "learned", 4),
        # prompt tokens also get the entropy / confidence features (logits at every prompt position)
        EvalConfig(
            "learned3p", {"target_bits": 3, "policy": "learned", "prompt_features": True}, nominal_bits=3
        ),
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


def check_training_overlap(configs: list[EvalConfig], spans: list[tuple[int, int]]) -> None:
    """Refuse to score WikiText-2 token spans that a learned config's controller was trained on.

    spans: the [start, end) token spans this evaluation scores. The training spans come from the
    model card beside the weights (`adakv train-controller` writes them)."""
    import json

    from adakv_vllm.controller.model import card_path
    from adakv_vllm.controller.policy import SHIPPED_WEIGHTS

    for config in configs:
        if not config.adakv or config.adakv.get("policy") != "learned":
            continue
        card = card_path(config.adakv.get("controller_weights") or SHIPPED_WEIGHTS)
        if not card.is_file():
            raise ValueError(f"{config.name}: no model card {card}, so training text cannot be ruled out")
        trained = json.loads(card.read_text())["data"]["training_spans"]
        clash = [(a, b) for a, b in spans for c, d in trained if a < d and c < b]
        if clash:
            raise ValueError(
                f"{config.name}: the controller was trained on WikiText-2 tokens that this evaluation scores "
                f"(first clash: window {clash[0]}); choose another --wikitext-window/--wikitext-limit"
            )
