"""Fit the controller MLP to sensitivity labels, and judge it by the allocations it leads to.

Label class of a token (documented procedure): c* = argmin_b  s_b + lam * bytes(b), b in
{2, 3, 4, 8, 16} (PRECISIONS), s_16 = 0, bytes(b) = its K+V record bytes per KV head; lam is set so
that the labels average `label_bits` bits (a Lagrangian: "the precision this token deserves at this
exchange rate").

Loss (the paper's form):  alpha * CE(logits, c*)  +  beta * E_p[bytes(b)] / bytes(16)
                          +  gamma * E_p[s_b] / mean(s_2)
(the paper's "1 - expected quality" is our expected normalised sensitivity).

Judging: `allocation_regret` runs the real planner (blocks/planner.py) on held-out blocks at a budget
of `target_bits`, for the learned scores, the random, rule and attention policies' scores and the
oracle (the true labels), and reports the total true sensitivity each allocation incurs. A label
prices a token's K AND V at one precision (training/labels.py), so the judge plans them jointly:
one allocation per block under the K+V budget of `target_bits` (cost = K+V record bytes), scored by
each policy's key scores. The engine plans keys and values apart under their own budgets
(key_value_split); with labels for K and V apart the judge could too.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from adakv_vllm.blocks import planner
from adakv_vllm.controller import policy as policies
from adakv_vllm.controller.features import feature_matrix
from adakv_vllm.controller.model import ControllerMLP
from adakv_vllm.quant import format as fmt
from adakv_vllm.quant.format import RecordLayout
from adakv_vllm.quant.precision import PRECISIONS

# the policies the learned controller is judged against (besides the oracle)
RIVALS = ("random", "rule", "attention")


@dataclasses.dataclass(frozen=True)
class FitSettings:
    epochs: int = 400
    lr: float = 3e-3
    weight_decay: float = 1e-4
    alpha: float = 1.0
    beta: float = 0.05
    gamma: float = 1.0
    label_bits: float = 3.0
    missing_dist_fraction: float = 0.5  # prompt tokens have no sampling distribution at serve time
    # tokens trained as if their attention were unmeasured (NaN at serve time where the worker
    # reported none for a block), so has_attention = 0 is an input the model has seen
    missing_attention_fraction: float = 0.1
    seed: int = 0


def record_bytes(head_size: int, group_size: int) -> torch.Tensor:
    """[len(PRECISIONS)] K+V record bytes of one token in one KV head at each precision."""
    record = RecordLayout(head_size, group_size)
    return torch.tensor([2.0 * record.record_bytes(p) for p in PRECISIONS])


def full_sensitivity(sens: torch.Tensor) -> torch.Tensor:
    """[N, len(LABEL_BITS)] labels at 2/3/4/8 bits -> [N, len(PRECISIONS)] with s_16 = 0 appended,
    made non-increasing (a lower precision cannot be better; measured inversions are noise)."""
    s = torch.cat([sens, torch.zeros(sens.shape[0], 1)], 1)
    return torch.cummax(s.flip(1), 1).values.flip(1)


def label_classes(s: torch.Tensor, cost: torch.Tensor, label_bits: float) -> tuple[torch.Tensor, float]:
    """s: [N, P]; cost: [P] -> classes [N] and the lam that makes the labels average label_bits."""
    bits = torch.tensor([float(p.bits) for p in PRECISIONS])
    lo, hi = 1e-9, 1e3
    for _ in range(60):  # mean label bits falls as lam grows: bisect on a log scale
        lam = math.sqrt(lo * hi)
        mean_bits = bits[(s + lam * cost).argmin(1)].mean()
        lo, hi = (lam, hi) if mean_bits > label_bits else (lo, lam)
    lam = math.sqrt(lo * hi)
    return (s + lam * cost).argmin(1), lam


def build_features(
    raw: dict,
    vocab_size: int,
    drop_dist: torch.Tensor | None = None,  # [N] bool: forget the sampling distribution
    drop_attention: torch.Tensor | None = None,  # [N] bool: forget the attention measurement
) -> torch.Tensor:
    """raw: flat per-token tensors (token_ids, positions, prior_count, qerr, entropy, prob,
    attention) -> [N, F]."""
    entropy, prob, attention = raw["entropy"].clone(), raw["prob"].clone(), raw["attention"].clone()
    if drop_dist is not None:
        entropy[drop_dist], prob[drop_dist] = float("nan"), float("nan")
    if drop_attention is not None:
        attention[drop_attention] = float("nan")
    return feature_matrix(
        raw["token_ids"],
        raw["positions"],
        raw["prior_count"],
        raw["qerr"],
        entropy,
        prob,
        attention,
        vocab_size,
    )


def fit(
    x: torch.Tensor,  # [N, F]
    s: torch.Tensor,  # [N, P] sensitivities, P = len(PRECISIONS)
    cost: torch.Tensor,  # [P]
    settings: FitSettings,
    mask: torch.Tensor | None = None,  # [F] bool: features the model may use (ablations)
    progress=None,
) -> tuple[ControllerMLP, dict]:
    torch.manual_seed(settings.seed)
    classes, lam = label_classes(s, cost, settings.label_bits)
    model = ControllerMLP(x.shape[1])
    use = torch.ones(x.shape[1], dtype=torch.bool) if mask is None else mask
    x = torch.where(use, x, 0.0)
    model.feature_mean.copy_(x.mean(0))
    model.feature_std.copy_(x.std(0).clamp_min(1e-3))
    table = torch.stack(
        [s[classes == c].mean(0) if (classes == c).any() else s.mean(0) for c in range(len(PRECISIONS))]
    )
    model.class_sensitivity.copy_(torch.cummax(table.flip(1), 1).values.flip(1))
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    s_norm = s / s[:, 0].mean().clamp_min(1e-12)
    for epoch in range(settings.epochs):
        logits = model(x)
        p = logits.softmax(-1)
        loss = (
            settings.alpha * F.cross_entropy(logits, classes)
            + settings.beta * (p @ cost / cost[-1]).mean()
            + settings.gamma * (p * s_norm).sum(-1).mean()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None:
            progress(epoch, loss.item())
    return model.eval(), {
        "lambda": lam,
        "class_counts": torch.bincount(classes, minlength=len(PRECISIONS)).tolist(),
    }


@torch.no_grad()
def classification_metrics(model: ControllerMLP, x, s, cost, label_bits) -> dict:
    classes, _ = label_classes(s, cost, label_bits)
    logits = model(x)
    pred = model.expected_sensitivity(x)[:, 0]
    return {
        "cross_entropy": float(F.cross_entropy(logits, classes)),
        "accuracy": float((logits.argmax(1) == classes).float().mean()),
        "spearman_s2": spearman(pred, s[:, 0]),
    }


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


@torch.no_grad()
def allocation_regret(
    blocks: list[dict],  # per held-out block: raw per-token tensors + "s" [T, P] + "x" [T, F]
    model: ControllerMLP | None,
    cost: torch.Tensor,  # [P] K+V bytes per KV head
    target_bits: float,
    head_size: int,
    group_size: int,
    seed: int = 0,
    sink_tokens: int = 4,
) -> dict[str, float]:
    """Total true sensitivity (nats, summed over blocks) of the planner's allocation per scorer:
    keys and values planned together under the K+V budget of target_bits (module docstring)."""
    record = RecordLayout(head_size, group_size)
    per_token = 2 * record.interpolated_bytes(target_bits)
    rivals = {
        name: policies.make_policy(name, target_bits, target_bits, seed, sink_tokens) for name in RIVALS
    }
    totals = {name: 0.0 for name in ("oracle", *RIVALS, *(("learned",) if model is not None else ()))}
    for b in blocks:
        n = b["s"].shape[0]
        budget = int(per_token * n)
        tokens = policies.BlockTokens(
            token_ids=b["token_ids"],
            positions=b["positions"],
            qerr=b["qerr"],
            first_occurrence=b["prior_count"] == 0,
            prior_count=b["prior_count"],
            attention=b["attention"],
        )
        scorers = {"oracle": (torch.ones(n), b["s"], None)}
        for name, policy in rivals.items():
            scorers[name] = (*policy.scores(tokens, "key"), policy.floor(tokens, "key"))
        if model is not None:
            d = model.expected_sensitivity(b["x"])
            d = torch.cummax(d.flip(1), 1).values.flip(1) + policies.STRICT_EPS * policies.STEPS_LEFT
            scorers["learned"] = (torch.ones(n), d, None)
        for name, (weight, distortion, floor) in scorers.items():
            bits = planner.allocate(weight, distortion, cost, budget, floor)
            codes = fmt.bits_to_codes(bits)
            totals[name] += float(b["s"].gather(1, codes[:, None]).sum())
    return totals
