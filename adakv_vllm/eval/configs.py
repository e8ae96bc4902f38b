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


def _adakv(policy: str, bits: float, split: float = 1.0, **extra) -> EvalConfig:
    """`{policy}{bits}`: target_bits = bits, keys +split/2, values -split/2 (the plugin's default
    split 1); `{policy}{bits}u`: split 0, the same bits for keys and values."""
    name = f"{policy}{bits:g}" + ("u" if split == 0 and policy != "static" else "")
    options = {"target_bits": bits, "key_value_split": split, "policy": policy, **extra}
    return EvalConfig(name, options, nominal_bits=bits)


CONFIGS: dict[str, EvalConfig] = {
    c.name: c
    for c in [
        EvalConfig("bf16", None),
        EvalConfig("fp8", None, kv_cache_dtype="fp8", nominal_bits=8),
        # uniform formats: every key and value at one precision ...
        _adakv("static", 8, split=0),
        _adakv("static", 4, split=0),
        _adakv("static", 3, split=0),
        _adakv("static", 2, split=0),
        # ... and keys one precision above values (K4/V3 at 3.5, K3/V2 at 2.5)
        _adakv("static", 3.5),
        _adakv("static", 2.5),
        # adaptive policies at the same page budgets (3.5: 4.2x the tokens of bf16, 3: 4.9x, 2.75: 5.2x)
        *(_adakv(policy, bits) for bits in (3.5, 3, 2.75) for policy in ("random", "attention", "rule")),
        _adakv("attention", 3, split=0),  # the split's share of the gain
        # the learned controller needs weights trained for this quantizer: adakv eval --controller-weights
        *(_adakv("learned", bits) for bits in (3.5, 3)),
    ]
}
DEFAULT_CONFIGS = tuple(name for name, c in CONFIGS.items() if not c.adakv or c.adakv["policy"] != "learned")
REFERENCE = "bf16"


def parse_configs(names: str, controller_weights: str | None = None) -> list[EvalConfig]:
    """Comma list -> configs; learned configs get `controller_weights` (required for them)."""
    out = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in CONFIGS:
            raise ValueError(f"unknown config {name!r}; choose from {sorted(CONFIGS)}")
        config = CONFIGS[name]
        if config.adakv and config.adakv["policy"] == "learned":
            if controller_weights is None:
                raise ValueError(
                    f"{name} needs controller weights trained for this quantizer: pass --controller-weights "
                    "(adakv train-controller writes them)"
                )
            config = dataclasses.replace(
                config, adakv={**config.adakv, "controller_weights": controller_weights}
            )
        out.append(config)
    return out


def check_training_overlap(
    configs: list[EvalConfig],
    spans: list[tuple[int, int]],
    mc_limits: dict[str, int | None] | None = None,
) -> None:
    """Refuse to score text that a learned config's controller was trained on.

    spans: the [start, end) WikiText-2 token spans this evaluation scores; mc_limits: the multiple
    choice tasks it scores and how many examples of each (in file order; None = all). The training
    spans and examples come from the model card beside the weights (`adakv train-controller`
    writes them); no controller is shipped, so a learned config names its weights (parse_configs)."""
    import json

    from adakv_vllm.controller.model import card_path

    for config in configs:
        if not config.adakv or config.adakv.get("policy") != "learned":
            continue
        weights = config.adakv.get("controller_weights")
        if weights is None:
            raise ValueError(f"{config.name}: no controller_weights, so training text cannot be ruled out")
        card = card_path(weights)
        if not card.is_file():
            raise ValueError(f"{config.name}: no model card {card}, so training text cannot be ruled out")
        trained = json.loads(card.read_text())["data"]
        clash = [(a, b) for a, b in spans for c, d in trained["training_spans"] if a < d and c < b]
        if clash:
            raise ValueError(
                f"{config.name}: the controller was trained on WikiText-2 tokens that this evaluation scores "
                f"(first clash: window {clash[0]}); choose another --wikitext-window/--wikitext-limit"
            )
        for task, limit in (mc_limits or {}).items():
            examples = trained.get("mc_examples", {}).get(task)
            if examples and (limit is None or limit > examples[0]):
                raise ValueError(
                    f"{config.name}: the controller was trained on {task} examples {examples[0]}.."
                    f"{examples[1] - 1}, which this evaluation scores; use --limit {examples[0]} or less"
                )
