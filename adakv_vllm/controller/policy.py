"""Precision policies behind one interface: weights and distortions for the tokens of a sealing page.

    static     every token at the part's target bits (distortion is a step at the target)
    random     random weights seeded by the page content: the honest control at matched average bits
    attention  the attention each token received from the later queries of its own block while the
               block was open (measured by the worker, kernels/block_attention.py): the tokens the
               model looks at get the bits (the default: benchmarks/quant_levers.py)
    rule       attention sinks first (up to 8 bits), then tokens whose own quantization error is
               largest, rare (first-in-sequence) tokens weighted up
    learned    the MLP of controller/model.py: expected KL sensitivity per precision from the features
               of controller/features.py (weights trained by `adakv train-controller`)

Keys and values are planned separately, each under its own share of the page (`part` = "key" or
"value"); a policy may score them alike. A policy never sees the budget: `blocks.planner.allocate`
turns its scores into bits under the page's byte budget, identically for every policy. Every decision
is a deterministic function of the block's tokens, positions and the features its writer reported, so
a prefix-cache hit reads the same bits whoever wrote the block first (the page is sealed once).
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from adakv_vllm.controller import features as feats
from adakv_vllm.quant.levels import QUANTIZER_ID
from adakv_vllm.quant.precision import PRECISIONS

if TYPE_CHECKING:
    from adakv_vllm.config import AdaKVConfig

# The weights shipped for SmolLM2-135M (trained by `adakv train-controller`, card beside them).
SHIPPED_WEIGHTS = Path(__file__).parent / "weights" / "smollm2-135m.safetensors"

# Distortion assumed when a token's own quantization error is unknown: the relative squared error of
# a Gaussian vector at 2/3/4/8/16 bits under the codebook quantizer (tests/quant/test_reference.py:
# relative L2 errors 0.33, 0.17, 0.083, 0.0057).
GENERIC_DISTORTION = torch.tensor([0.108, 0.0284, 0.0069, 3.2e-5, 0.0])
RARE_TOKEN_BOOST = 0.5
SINK_FLOOR_BITS = 8
STRICT_EPS = 1e-9
STEPS_LEFT = torch.arange(len(PRECISIONS) - 1, -1, -1, dtype=torch.float32)  # steps above each code
PARTS = ("key", "value")


@dataclasses.dataclass
class BlockTokens:
    """What the scheduler knows about the tokens of one sealing block."""

    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position in the sequence
    qerr: torch.Tensor  # [T, NUM_QERR] relative reconstruction error at QERR_BITS (NaN = unknown)
    first_occurrence: torch.Tensor  # [T] bool, token id not seen earlier in the sequence
    # [T, 2] entropy (nats) and probability of the distribution that sampled each generated token;
    # NaN for prompt tokens (no sampler ran for them). Used by the learned policy.
    sampled: torch.Tensor | None = None
    prior_count: torch.Tensor | None = None  # [T] int64, earlier occurrences of the id in the sequence
    # [T] mean attention each token received from the later queries of its block (NaN = unknown)
    attention: torch.Tensor | None = None


class Policy:
    name = "base"
    reads_qerr = False  # does `scores` read BlockTokens.qerr (the worker then measures it each step)?
    reads_attention = False  # ... BlockTokens.attention (the worker then measures it in every layer)?
    reads_distribution = False  # ... BlockTokens.sampled (the worker then takes a softmax per sample)?

    def __init__(self, key_bits: float, value_bits: float, seed: int = 0, sink_tokens: int = 0):
        self.targets = {"key": key_bits, "value": value_bits}
        self.seed, self.sink_tokens = seed, sink_tokens

    def scores(self, block: BlockTokens, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """-> weight [T], distortion [T, len(PRECISIONS)] (per precision code, non-increasing)."""
        raise NotImplementedError

    def scores_many(self, blocks: list[BlockTokens], part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`scores` of n >= 1 blocks of T tokens -> weight [n, T], distortion [n, T, P]: the same
        numbers, block by block here; a policy may compute them together (the scheduler's seal
        planning calls this for every block that seals in a step)."""
        scores = [self.scores(block, part) for block in blocks]
        return torch.stack([w for w, _ in scores]), torch.stack([d for _, d in scores])

    def floor(self, block: BlockTokens, part: str) -> torch.Tensor | None:
        """Optional [T] bit-widths the planner grants first, budget permitting."""
        return None


class StaticPolicy(Policy):
    name = "static"

    def scores(self, block, part):
        weight, distortion = self.scores_many([block], part)
        return weight[0], distortion[0]

    def scores_many(self, blocks, part):
        shape = (len(blocks), blocks[0].token_ids.numel())
        # Distortion = steps still missing to the target, so every step up to it has gain 1.
        target = self.targets[part]
        steps = torch.tensor(
            [float(sum(q.bits < target for q in PRECISIONS[i:])) for i in range(len(PRECISIONS))]
        )
        return torch.ones(shape), steps.expand(*shape, -1)


class RandomPolicy(Policy):
    name = "random"

    def scores(self, block, part):
        gen = torch.Generator().manual_seed(content_seed(block, self.seed) + PARTS.index(part))
        weight = torch.rand(block.token_ids.numel(), generator=gen)
        return weight, GENERIC_DISTORTION.expand(block.token_ids.numel(), -1)


class AttentionPolicy(Policy):
    name = "attention"
    reads_attention = True

    def scores(self, block, part):
        weight, distortion = self.scores_many([block], part)
        return weight[0], distortion[0]

    def scores_many(self, blocks, part):
        num_tokens = blocks[0].token_ids.numel()
        unknown = torch.full((num_tokens,), float("nan"))
        weight = torch.stack([unknown if b.attention is None else b.attention.float() for b in blocks])
        known = ~torch.isnan(weight)
        # unmeasured tokens (e.g. written by another TP rank's heads only) get their block's median
        # (the lower of the two middle values, as torch.median), 1 in a block with none measured
        fill = torch.nanmedian(weight, dim=1, keepdim=True).values
        fill = torch.where(torch.isnan(fill), 1.0, fill)
        weight = torch.where(known, weight, fill).clamp_min(0.0)
        return weight, GENERIC_DISTORTION.expand(len(blocks), num_tokens, -1)


class RulePolicy(Policy):
    name = "rule"
    reads_qerr = True

    def scores(self, block, part):
        num_tokens = block.token_ids.numel()
        distortion = GENERIC_DISTORTION.repeat(num_tokens, 1)
        known = ~torch.isnan(block.qerr).any(-1)
        distortion[known, : feats.NUM_QERR] = block.qerr[known].float() ** 2
        # Keep it strictly decreasing even if a measured error is not, so no step has zero gain.
        distortion = torch.cummax(distortion.flip(1), 1).values.flip(1) + STRICT_EPS * STEPS_LEFT
        weight = 1.0 + RARE_TOKEN_BOOST * block.first_occurrence.float()
        return weight, distortion

    def floor(self, block, part):
        # Sinks are granted 8 bits first: their 8-bit error (~0.5%) is negligible, while a 16-bit
        # floor would starve the rest of the first page. Beyond 8 bits they compete like any token.
        return torch.where(block.positions < self.sink_tokens, SINK_FLOOR_BITS, PRECISIONS[0].bits)


class LearnedPolicy(Policy):
    name = "learned"
    reads_qerr = True
    reads_attention = True
    reads_distribution = True

    def __init__(
        self, key_bits, value_bits, seed=0, sink_tokens=0, vocab_size=None, weights=None, expect=None
    ):
        from adakv_vllm.controller import model as controller_model

        super().__init__(key_bits, value_bits, seed, sink_tokens)
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

    def scores(self, block, part):
        num_tokens = block.token_ids.numel()
        sampled = block.sampled if block.sampled is not None else torch.full((num_tokens, 2), float("nan"))
        prior = block.prior_count if block.prior_count is not None else (~block.first_occurrence).long()
        attention = (
            block.attention if block.attention is not None else torch.full((num_tokens,), float("nan"))
        )
        x = feats.feature_matrix(
            block.token_ids,
            block.positions,
            prior,
            block.qerr,
            sampled[:, 0],
            sampled[:, 1],
            attention,
            self.vocab_size,
        )
        distortion = self.model.expected_sensitivity(x)
        distortion = torch.cummax(distortion.flip(1), 1).values.flip(1) + STRICT_EPS * STEPS_LEFT
        return torch.ones(num_tokens), distortion


POLICIES = {cls.name: cls for cls in (StaticPolicy, RandomPolicy, AttentionPolicy, RulePolicy, LearnedPolicy)}


def resolve(name: str, weights: str | None) -> tuple[str, str]:
    """-> (the policy to run, why). `auto` -> `attention` (the best policy measured without a trained
    controller, benchmarks/quant_levers.py), or `learned` when the user names controller weights:
    a missing, corrupt or mismatched file is then an error (raised by make_policy), never a silent
    fallback. Other names pass unchanged."""
    if name != "auto":
        return name, "asked for"
    if weights is not None:
        return "learned", f"auto: controller_weights {weights}"
    return "attention", "auto: the attention each token receives in its own block"


def make_policy(
    name: str, key_bits: float, value_bits: float, seed: int = 0, sink_tokens: int = 0, **learned
) -> Policy:
    """learned: vocab_size, weights (path or None = shipped), expect (metadata that must match);
    only the learned policy takes them."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    if name == "learned":
        return LearnedPolicy(key_bits, value_bits, seed, sink_tokens, **learned)
    return POLICIES[name](key_bits, value_bits, seed, sink_tokens)


def policy_for(cfg: AdaKVConfig, vocab_size: int | None, group_size: int) -> tuple[Policy, str]:
    """The policy an engine runs for its options (`auto` resolved) and why. Loads and validates
    the learned controller's weights, so call it at engine start: errors name the file."""
    name, why = resolve(cfg.policy, cfg.controller_weights)
    learned = {}
    if name == "learned":
        expect = controller_expectations(group_size)
        learned = dict(vocab_size=vocab_size, weights=cfg.controller_weights, expect=expect)
    return make_policy(name, *cfg.key_value_bits(), cfg.seed, cfg.sink_tokens, **learned), why


def controller_expectations(group_size: int) -> dict[str, str]:
    """The weights-file metadata that must match this run's quantizer (the qerr features depend on it)."""
    return {"quantizer": QUANTIZER_ID, "group_size": str(group_size)}


def content_seed(block: BlockTokens, seed: int) -> int:
    """A seed that depends only on the block's tokens, positions and the user's seed."""
    data = torch.stack([block.token_ids, block.positions]).to(torch.int64).numpy().tobytes()
    return zlib.crc32(data, seed & 0xFFFFFFFF)
