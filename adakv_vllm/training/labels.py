"""Sensitivity labels: how much storing ONE cached token at b bits hurts the predictions after it.

Procedure (SmolLM2 in fp32, on WikiText-2 text outside every scored evaluation window):
  1. prefill a window of `window + horizon` tokens (its first token is the sequence start) and keep
     the post-RoPE K/V of every layer, the reference log-probabilities and the per-token raw features;
  2. for a labelled position i and b in LABEL_BITS (2, 3, 4, 8): replace token i's cached K AND V in
     every layer by what a sealed page returns at b bits (`quant.reference.stored_kv` of the bf16
     values vLLM caches: the store's quantizer, Hadamard rotation included), keep everything before
     i exact, and recompute positions i+1 .. i+horizon;
  3. label s_b(i) = sum over those positions of KL(reference || perturbed) of the next-token
     distribution, in nats. Position i's own query reads its exact K/V, as in AdaKV where a token is
     still in FP16 staging when it is written. s_16 = 0.
Keys and values are perturbed together at one precision, so a label prices a token's K+V record;
the serving engine plans keys and values under separate budgets (training/fit.py says how the
allocation judge copes). Effects beyond `horizon` tokens are not counted (a truncation; attention in
SmolLM2 is mostly local plus a few sink tokens). Variants of many windows and all precisions run in
one batch per i.

Raw per-token quantities saved beside the labels (the serving engine measures the same ones;
controller/features.py turns them into the controller's inputs): token ids, prior count (occurrences
of the same id earlier in the sequence), quantization error at QERR_BITS (the mean of K and V, then
over layers, of the relative errors of the bf16 K/V, as KVStore.step_features measures them),
entropy and probability of the next-token distribution that produced the token (teacher-forced),
and the `attention` the token received inside its own block of BLOCK_SIZE tokens over all layers
(forward.received_in_block, as kernels/block_attention.py measures it).
"""

from __future__ import annotations

import dataclasses

import torch
from tqdm import tqdm

from adakv_vllm.controller.features import QERR_BITS, QERR_PRECISIONS
from adakv_vllm.kernels import cpu, library
from adakv_vllm.quant.precision import Precision
from adakv_vllm.quant.reference import relative_errors, stored_kv
from adakv_vllm.training.forward import BLOCK_SIZE

LABEL_BITS = QERR_BITS  # the precisions labelled (s_16 = 0 is appended by training/fit.py)


@dataclasses.dataclass(frozen=True)
class LabelSettings:
    window: int = 256  # positions 0 .. window-1 can be labelled; window + horizon tokens are read
    horizon: int = 32  # predictions summed into a label
    position_stride: int = 8  # label every stride-th position (all of the first `dense_head`)
    dense_head: int = 16
    group_size: int = 64  # the engine's default for SmolLM2's 64-wide heads (AdaKVConfig.group_size_for)

    def positions(self) -> list[int]:
        dense = range(min(self.dense_head, self.window))
        return sorted(set(range(0, self.window, self.position_stride)) | set(dense))


def training_starts(num_tokens: int, length: int, count: int, exclude: list[tuple[int, int]]) -> list[int]:
    """`count` starts of `length`-token windows, evenly spread over [0, num_tokens), none overlapping
    an excluded [start, end) span. Raises if the text is too short."""
    free, cursor = [], 0
    for a, b in sorted(exclude) + [(num_tokens, num_tokens)]:
        for s in range(cursor, a - length + 1, length):
            free.append(s)
        cursor = max(cursor, b)
    if len(free) < count:
        raise ValueError(
            f"only {len(free)} windows of {length} tokens avoid the evaluation spans; asked {count}"
        )
    step = len(free) / count
    return [free[int(k * step)] for k in range(count)]


def raw_features(ids: torch.Tensor, logits, keys, values, attention, settings: LabelSettings) -> dict:
    """Per-token raw quantities of a prefilled batch. ids: [W, L]; keys, values: per layer
    [W, Hkv, L, D]; attention: [W, L] -> dict of [W, L] tensors ("qerr": [W, L, NUM_QERR])."""
    w, length = ids.shape
    logp = logits.log_softmax(-1)  # [W, L, V]
    entropy = torch.full((w, length), float("nan"))
    prob = torch.full((w, length), float("nan"))
    entropy[:, 1:] = -(logp[:, :-1].exp() * logp[:, :-1]).sum(-1)
    prob[:, 1:] = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).exp()
    qerr = torch.zeros(w * length, len(QERR_BITS))
    for k, v in zip(keys, values, strict=True):
        # [W, Hkv, L, D] -> K and V rows [2*W*L, Hkv, D], in bf16 as vLLM caches them
        kv = torch.cat([x.bfloat16().transpose(1, 2).flatten(0, 1) for x in (k, v)])
        qerr += _relative_errors(kv, settings.group_size).view(2, w * length, -1).mean(0)
    qerr = (qerr / len(keys)).view(w, length, -1)
    prior = torch.zeros(w, length, dtype=torch.int64)
    for row in range(w):
        seen: dict[int, int] = {}
        for t, token in enumerate(ids[row].tolist()):
            prior[row, t] = seen.get(token, 0)
            seen[token] = seen.get(token, 0) + 1
    return {
        "token_ids": ids,
        "prior_count": prior,
        "qerr": qerr,
        "entropy": entropy,
        "prob": prob,
        "attention": attention,
    }


def _relative_errors(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x: [T, H, D] -> [T, NUM_QERR]: what the worker measures (blocks/store.py), by the compiled
    kernel where it builds (~250x faster than its oracle, against which tests/kernels checks it),
    else by the oracle, quant.reference.relative_errors."""
    module = library.load()
    if module is None:
        return relative_errors(x, QERR_PRECISIONS, group_size)
    return cpu.relative_errors(x, QERR_PRECISIONS, group_size, module)


@torch.no_grad()
def label_batch(probe, ids: torch.Tensor, settings: LabelSettings, progress: bool = True) -> dict:
    """ids: [W, window + horizon] -> raw features of positions 0..window-1 and labels
    `sensitivity` [W, P, len(LABEL_BITS)] (nats; P labelled positions, `positions` [P])."""
    w = ids.shape[0]
    logits, keys, values, attention = probe.prefill(ids, BLOCK_SIZE)
    raw = {
        k: v[:, : settings.window]
        for k, v in raw_features(ids, logits, keys, values, attention, settings).items()
    }
    ref_logp = logits.log_softmax(-1)
    positions = settings.positions()
    sens = torch.zeros(w, len(positions), len(LABEL_BITS))
    nb = len(LABEL_BITS)
    for row, i in enumerate(tqdm(positions, desc="labels", unit="pos", disable=not progress)):
        # token i's exact K and V of every layer [2, layers, W, Hkv, D], then what a page returns
        # at each label precision: one quantizer call per precision (its per-call cost dominates)
        exact = torch.stack([torch.stack([x[:, :, i] for x in kv]) for kv in (keys, values)])
        stored = torch.cat(
            [stored_kv(exact.bfloat16(), Precision(b), settings.group_size) for b in LABEL_BITS], 2
        )
        past_k, past_v = [], []
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            pk = k[:, :, : i + 1].repeat(nb, 1, 1, 1)  # [nb*W, Hkv, i+1, D], precision-major
            pv = v[:, :, : i + 1].repeat(nb, 1, 1, 1)
            pk[:, :, i], pv[:, :, i] = stored[0, layer], stored[1, layer]
            past_k.append(pk)
            past_v.append(pv)
        following = ids[:, i + 1 : i + 1 + settings.horizon]  # [W, H]
        out, _, _ = probe.continue_from(following.repeat(nb, 1), past_k, past_v)
        ref = ref_logp[:, i + 1 : i + 1 + settings.horizon].repeat(nb, 1, 1)  # [nb*W, H, V]
        kl = (ref.exp() * (ref - out.log_softmax(-1))).sum(-1).sum(-1)  # [nb*W]
        sens[:, row] = kl.view(nb, w).T.clamp_min(0)
    return {**raw, "positions": torch.tensor(positions), "sensitivity": sens}
