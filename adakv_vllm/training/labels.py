"""Sensitivity labels: how much storing ONE cached token at b bits hurts the predictions after it.

Procedure (SmolLM2 in fp32, on WikiText-2 text outside every scored evaluation window):
  1. prefill a window of `window + horizon` tokens (its first token is the sequence start) and keep
     the post-RoPE K/V of every layer, the reference log-probabilities and the per-token raw features;
  2. for a labelled position i and b in {2, 4, 8}: replace token i's cached K and V in every layer by
     what a sealed page returns at b bits (`quant.reference.stored_kv`: the store's quantizer, rotation
     included), keep everything before i exact, and recompute positions i+1 .. i+horizon;
  3. label s_b(i) = sum over those positions of KL(reference || perturbed) of the next-token
     distribution, in nats. Position i's own query reads its exact K/V, as in AdaKV where a token is
     still in FP16 staging when it is written. s_16 = 0.
Effects beyond `horizon` tokens are not counted (a truncation; attention in SmolLM2 is mostly local
plus a few sink tokens). Variants of many windows and all three precisions run in one batch per i.

Raw per-token quantities saved beside the labels (the runtime computes the same ones; features.py
turns them into the controller's inputs): token ids, prior count (occurrences of the same id earlier
in the sequence), quantization error at 2/4/8 bits (mean over layers of K and V), entropy and
probability of the next-token distribution that produced the token (teacher-forced), and, for the
ablation only, the final layer's block-local attention received (mean and variance over heads).
"""

from __future__ import annotations

import dataclasses

import torch
from tqdm import tqdm

from adakv_vllm.quant.precision import Precision
from adakv_vllm.quant.reference import relative_error, stored_kv

LABEL_BITS = (2, 4, 8)
BLOCK_SIZE = 32  # the plugin's default block size: bounds the block-local attention feature


@dataclasses.dataclass(frozen=True)
class LabelSettings:
    window: int = 256  # positions 0 .. window-1 can be labelled; window + horizon tokens are read
    horizon: int = 32  # predictions summed into a label
    position_stride: int = 8  # label every stride-th position (all of the first `dense_head`)
    dense_head: int = 16
    group_size: int = 32
    rotate_keys: bool = True

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


def raw_features(ids: torch.Tensor, logits, keys, values, last_attention, settings: LabelSettings) -> dict:
    """Per-token raw quantities of a prefilled batch. ids: [W, L] -> dict of [W, L(, 3)] tensors."""
    w, length = ids.shape
    logp = logits.log_softmax(-1)  # [W, L, V]
    entropy = torch.full((w, length), float("nan"))
    prob = torch.full((w, length), float("nan"))
    entropy[:, 1:] = -(logp[:, :-1].exp() * logp[:, :-1]).sum(-1)
    prob[:, 1:] = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).exp()
    qerr = torch.zeros(w, length, len(LABEL_BITS))
    for k, v in zip(keys, values, strict=True):  # [W, Hkv, L, D]: errors of the bf16 values vLLM caches
        k, v = k.bfloat16().transpose(1, 2).flatten(0, 1), v.bfloat16().transpose(1, 2).flatten(0, 1)
        for c, bits in enumerate(LABEL_BITS):
            p = Precision.parse(bits)
            err = relative_error(k, p, settings.group_size, settings.rotate_keys)
            err = err + relative_error(v, p, settings.group_size, False)
            qerr[:, :, c] += (err / 2).view(w, length)
    qerr /= len(keys)
    prior = torch.zeros(w, length, dtype=torch.int64)
    for row in range(w):
        seen: dict[int, int] = {}
        for t, token in enumerate(ids[row].tolist()):
            prior[row, t] = seen.get(token, 0)
            seen[token] = seen.get(token, 0) + 1
    # attention token i receives from the queries of its own block (i .. block end), final layer
    pos = torch.arange(length)
    same_block = (pos[:, None] // BLOCK_SIZE == pos[None, :] // BLOCK_SIZE) & (pos[:, None] >= pos[None, :])
    received = (last_attention * same_block).sum(2)  # [W, Hq, L] (sum over queries j)
    return {
        "token_ids": ids,
        "prior_count": prior,
        "qerr": qerr,
        "entropy": entropy,
        "prob": prob,
        "attn_local": received.mean(1),
        "attn_var": received.var(1),
    }


@torch.no_grad()
def label_batch(probe, ids: torch.Tensor, settings: LabelSettings, progress: bool = True) -> dict:
    """ids: [W, window + horizon] -> raw features of positions 0..window-1 and labels
    `sensitivity` [W, P, 3] (nats; P labelled positions, `positions` [P])."""
    w = ids.shape[0]
    logits, keys, values, last_attention = probe.prefill(ids)
    raw = {
        k: v[:, : settings.window]
        for k, v in raw_features(ids, logits, keys, values, last_attention, settings).items()
    }
    ref_logp = logits.log_softmax(-1)
    positions = settings.positions()
    sens = torch.zeros(w, len(positions), len(LABEL_BITS))
    nb = len(LABEL_BITS)
    for row, i in enumerate(tqdm(positions, desc="labels", unit="pos", disable=not progress)):
        past_k, past_v = [], []
        for k, v in zip(keys, values, strict=True):
            pk = k[:, :, : i + 1].repeat(nb, 1, 1, 1)  # [nb*W, Hkv, i+1, D], precision-major
            pv = v[:, :, : i + 1].repeat(nb, 1, 1, 1)
            for c, bits in enumerate(LABEL_BITS):
                p = Precision.parse(bits)
                rows = slice(c * w, (c + 1) * w)
                pk[rows, :, i] = stored_kv(
                    k[:, :, i].bfloat16(), p, settings.group_size, settings.rotate_keys
                )
                pv[rows, :, i] = stored_kv(v[:, :, i].bfloat16(), p, settings.group_size, False)
            past_k.append(pk)
            past_v.append(pv)
        following = ids[:, i + 1 : i + 1 + settings.horizon]  # [W, H]
        out, _, _ = probe.continue_from(following.repeat(nb, 1), past_k, past_v)
        ref = ref_logp[:, i + 1 : i + 1 + settings.horizon].repeat(nb, 1, 1)  # [nb*W, H, V]
        kl = (ref.exp() * (ref - out.log_softmax(-1))).sum(-1).sum(-1)  # [nb*W]
        sens[:, row] = kl.view(nb, w).T.clamp_min(0)
    return {**raw, "positions": torch.tensor(positions), "sensitivity": sens}
