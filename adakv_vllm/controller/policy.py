"""Precision policies behind one interface: weights and distortions for the tokens of a sealing page.

    static   every token at target_bits (distortion is a step at the target)
    random   random weights seeded by the page content: the honest control at matched average bits
    rule     attention sinks first (up to 8 bits), then tokens whose own quantization error is largest, rare
             (first-in-sequence) tokens weighted up
    learned  the MLP of controller/model.py: expected KL sensitivity per precision from the features of
             controller/features.py (weights trained by `adakv train-controller`)

A policy never sees the budget: `blocks.planner.allocate` turns its scores into bits under the
page's byte budget, identically for every policy. Every decision is a deterministic function of the
block's tokens, positions and the features its writer reported, so a prefix-cache hit reads the same
bits whoever wrote the block first (the page is sealed once and never rewritten).
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from adakv_vllm.controller import features as feats
from adakv_vllm.quant.precision import PRECISIONS

if TYPE_CHECKING:
    from adakv_vllm.config import AdaKVConfig

# The weights shipped for SmolLM2-135M (trained by `adakv train-controller`, card beside them).
SHIPPED_WEIGHTS = Path(__file__).parent / "weights" / "smollm2-135m.safetensors"

# Distortion assumed when a token's own quantization error is unknown: relative squared error of
# RTN at b bits falls about 4x per extra bit (examples/quant_error.py: 0.50, 0.10, 0.006 at 2/4/8).
GENERIC_DISTORTION = torch.tensor([0.25, 0.01, 4e-5, 0.0])
RARE_TOKEN_BOOST = 0.5
SINK_FLOOR_BITS = 8
STRICT_EPS = 1e-9
STEPS_LEFT = torch.tensor([3.0, 2.0, 1.0, 0.0])  # precision steps above each code


@dataclasses.dataclass
class BlockTokens:
    """What the scheduler knows about the tokens of one sealing block."""

    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position in the sequence
    qerr: torch.Tensor  # [T, 3] relative reconstruction error at 2/4/8 bits (NaN = unknown)
    first_occurrence: torch.Tensor  # [T] bool, token id not seen earlier in the sequence
    # [T, 2] entropy (nats) and probability of the distribution that sampled each generated token;
    # NaN for prompt tokens (no sampler ran for them). Used by the learned policy.
    sampled: torch.Tensor | None = None
    prior_count: torch.Tensor | None = None  # [T] int64, earlier occurrences of the id in the sequence


class Policy:
    name = "base"
    reads_qerr = False  # does `scores` read BlockTokens.qerr (the worker then measures it each step)?

    def __init__(self, target_bits: float, seed: int = 0, sink_tokens: int = 0):
        self.target_bits, self.seed, self.sink_tokens = target_bits, seed, sink_tokens

    def scores(self, block: BlockTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """-> weight [T], distortion [T, 4] (per precision code, non-increasing)."""
        raise NotImplementedError

    def floor(self, block: BlockTokens) -> torch.Tensor | None:
        """Optional [T] bit-widths the planner grants first, budget permitting."""
        return None


class StaticPolicy(Policy):
    name = "static"

    def scores(self, block):
        num_tokens = block.token_ids.numel()
        # Distortion = steps still missing to the target, so every step up to it has gain 1.
        steps = torch.tensor(
            [float(sum(q.bits < self.target_bits for q in PRECISIONS[i:])) for i in range(4)]
        )
        return torch.ones(num_tokens), steps.expand(num_tokens, -1)


class RandomPolicy(Policy):
    name = "random"

    def scores(self, block):
        gen = torch.Generator().manual_seed(content_seed(block, self.seed))
        weight = torch.rand(block.token_ids.numel(), generator=gen)
        return weight, GENERIC_DISTORTION.expand(block.token_ids.numel(), -1)


class RulePolicy(Policy):
    name = "rule"
    reads_qerr = True

    def scores(self, block):
        num_tokens = block.token_ids.numel()
        distortion = GENERIC_DISTORTION.repeat(num_tokens, 1)
        known = ~torch.isnan(block.qerr).any(-1)
        distortion[known, :3] = block.qerr[known].float() ** 2
        # Keep it strictly decreasing even if a measured error is not, so no step has zero gain.
        distortion = torch.cummax(distortion.flip(1), 1).values.flip(1) + STRICT_EPS * STEPS_LEFT
        weight = 1.0 + RARE_TOKEN_BOOST * block.first_occurrence.float()
        return weight, distortion

    def floor(self, block):
        # Sinks are granted 8 bits first: their 8-bit error (~0.5%) is negligible, while a 16-bit
        # floor would starve the rest of the first page. Beyond 8 bits they compete like any token.
        return torch.where(block.positions < self.sink_tokens, SINK_FLOOR_BITS, PRECISIONS[0].bits)


class LearnedPolicy(Policy):
    name = "learned"
    reads_qerr = True

    def __init__(self, target_bits, seed=0, sink_tokens=0, vocab_size=None, weights=None, expect=None):
        from adakv_vllm.controller import model as controller_model

        super().__init__(target_bits, seed, sink_tokens)
        if vocab_size is None:
            raise ValueError("the learned policy needs the model's vocab_size")
        self.vocab_size = vocab_size
        path = weights or SHIPPED_WEIGHTS
        self.model, self.metadata = controller_model.load(path, expect)
        if self.metadata.get("vocab_size") != str(vocab_size):
            raise ValueError(
                f"controller weights {path} were trained for {self.metadata.get('model')} (vocab "
                f"{self.metadata.get('vocab_size')}); this model's vocab is {vocab_size}. Train weights "
                "for it with `adakv train-controller --model ...` and pass controller_weights"
            )

    def scores(self, block):
        num_tokens = block.token_ids.numel()
        sampled = block.sampled if block.sampled is not None else torch.full((num_tokens, 2), float("nan"))
        prior = block.prior_count if block.prior_count is not None else (~block.first_occurrence).long()
        x = feats.feature_matrix(
            block.token_ids, block.positions, prior, block.qerr, sampled[:, 0], sampled[:, 1], self.vocab_size
        )
        distortion = self.model.expected_sensitivity(x)
        distortion = torch.cummax(distortion.flip(1), 1).values.flip(1) + STRICT_EPS * STEPS_LEFT
        return torch.ones(num_tokens), distortion


POLICIES = {cls.name: cls for cls in (StaticPolicy, RandomPolicy, RulePolicy, LearnedPolicy)}


def resolve(
    name: str, vocab_size: int | None, weights: str | None, expect: dict[str, str]
) -> tuple[str, str]:
    """-> (the policy to run, why). `auto` -> `learned` when the controller fits this run -- the
    shipped weights (SmolLM2-135M) when their vocabulary and quantizer settings (`expect`, see
    controller_expectations) match, else `rule`, the best policy without a trained controller.
    Weights the user names are always used: a missing, corrupt or mismatched file is then an error
    (raised by make_policy), never a silent fallback. Other names pass unchanged."""
    if name != "auto":
        return name, "asked for"
    if weights is not None:
        return "learned", f"auto: controller_weights {weights}"
    from adakv_vllm.controller import model as controller_model

    metadata = controller_model.read_metadata(SHIPPED_WEIGHTS)
    wanted = {"vocab_size": str(vocab_size), **expect}
    misfit = [f"{k} {metadata.get(k)!r} (this run: {v!r})" for k, v in wanted.items() if metadata.get(k) != v]
    if misfit:
        return "rule", "auto: the shipped controller was trained with " + ", ".join(misfit)
    return "learned", "auto: the shipped controller fits this model and quantizer"


def make_policy(name: str, target_bits: float, seed: int = 0, sink_tokens: int = 0, **learned) -> Policy:
    """learned: vocab_size, weights (path or None = shipped), expect (metadata that must match);
    only the learned policy takes them."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    if name == "learned":
        return LearnedPolicy(target_bits, seed, sink_tokens, **learned)
    return POLICIES[name](target_bits, seed, sink_tokens)


def policy_for(cfg: AdaKVConfig, vocab_size: int | None) -> tuple[Policy, str]:
    """The policy an engine runs for its options (`auto` resolved) and why. Loads and validates
    the learned controller's weights, so call it at engine start: errors name the file."""
    expect = controller_expectations(cfg.group_size, cfg.rotate_keys)
    name, why = resolve(cfg.policy, vocab_size, cfg.controller_weights, expect)
    learned = {}
    if name == "learned":
        learned = dict(vocab_size=vocab_size, weights=cfg.controller_weights, expect=expect)
    return make_policy(name, cfg.target_bits, cfg.seed, cfg.sink_tokens, **learned), why


def controller_expectations(group_size: int, rotate_keys: bool) -> dict[str, str]:
    """The weights-file metadata that must match this run's quantizer (the qerr features depend on it)."""
    return {"group_size": str(group_size), "rotate_keys": str(bool(rotate_keys)).lower()}


def content_seed(block: BlockTokens, seed: int) -> int:
    """A seed that depends only on the block's tokens, positions and the user's seed."""
    data = torch.stack([block.token_ids, block.positions]).to(torch.int64).numpy().tobytes()
    return zlib.crc32(data, seed & 0xFFFFFFFF)
