"""The attention each cached token receives inside its own block while the block is open.

For every query token of a step, softmax(scale * q . k) over the keys of ITS OWN block up to itself
(from FP16 staging, exact), summed over query heads: how much the later tokens of the block look at
each earlier one. The store accumulates these sums per staged token across steps and layers; when the
block is full, received / seen (the number of query-head rows that could see the token) is the
`attention` policy's weight (controller/policy.py). Normalising inside the block, not over the whole
context, is what lets it be computed from staging alone; benchmarks/quant_levers.py measured it to
allocate bits as well as the attention from the whole context does.

    block_attention(query, staging_key, slot_of_block, slot_mapping, block_size, scale)
        -> (staging slots [U], received [U, block_size], seen [U, block_size])

The part that depends only on the step's slots (which blocks, where each query sits, the masks and
`seen`) is `locate`, computed once per step; `attend` is the per-layer part, and the oracle of the
compiled kernel the store uses where the library builds (csrc/cpu_block_attn.cpp, kernels/cpu.py).

Two shapes of the same computation: a prefill step has many queries per block, so queries are laid
out per block and multiplied with the block's keys at once; a decode step has one query per block,
so each query meets its own block's keys. `block_attention_ref` is the oracle (a loop per token).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class BlockQueries:
    """Where a step's queries sit in their open blocks: the same for every layer of the step, so the
    store computes it once per step (`locate`) and every layer's `attend` reuses it."""

    valid: torch.Tensor  # [T] bool, rows of the step that write a slot
    rows: torch.Tensor  # [V] int64, their indices
    staged: torch.Tensor  # [V] int64 staging slot of each valid query's block
    unique: torch.Tensor  # [U] int64 staging slots of the blocks the step writes
    inverse: torch.Tensor  # [V] row of `unique` of each valid query
    offset: torch.Tensor  # [V] position of each valid query in its block
    visible: torch.Tensor  # prefill: [bs, bs] causal mask; decode: [V, bs]
    present: torch.Tensor | None  # prefill: [U, bs] bool, a query at that position this step
    seen: torch.Tensor  # [U, bs] float, query-head rows that see each token in one layer


def locate(slot_of_block, slot_mapping, block_size: int, num_heads: int) -> BlockQueries | None:
    """The step's BlockQueries; None when it writes no slot."""
    valid = slot_mapping >= 0
    # a written slot whose block has no staging (never, when the store planned the step's writes)
    # is skipped rather than read from another block's slot
    valid[valid.clone()] = slot_of_block[slot_mapping[valid] // block_size] >= 0
    slots = slot_mapping[valid]
    if slots.numel() == 0:
        return None
    staged = slot_of_block[slots // block_size]  # [V]
    offset = slots % block_size  # [V]
    unique, inverse = torch.unique(staged, return_inverse=True)  # [U], [V]
    rows = valid.nonzero().squeeze(1)
    positions = torch.arange(block_size)
    if slots.numel() * 4 >= unique.numel() * block_size:  # prefill-shaped: queries laid out per block
        present = torch.zeros(unique.numel(), block_size, dtype=torch.bool)
        present[inverse, offset] = True
        visible = positions[None, :] <= positions[:, None]  # [q, k]
        seen = (visible[None] & present[:, :, None]).sum(1).float() * num_heads  # [U, bs]
        return BlockQueries(valid, rows, staged, unique, inverse, offset, visible, present, seen)
    visible = positions[None, :] <= offset[:, None]  # [V, bs]
    seen = torch.zeros(unique.numel(), block_size).index_add_(0, inverse, visible.float() * num_heads)
    return BlockQueries(valid, rows, staged, unique, inverse, offset, visible, None, seen)


def attend(query: torch.Tensor, staging_key: torch.Tensor, where: BlockQueries, scale: float) -> torch.Tensor:
    """One layer: query [T, num_heads, head_size] (post-RoPE, the step's tokens), staging_key
    [num_slots, block_size, num_kv_heads, head_size] -> received [U, block_size]."""
    q = query[: where.valid.numel()][where.valid].float()  # [V, H, D]
    keys = staging_key[where.unique].float()  # [U, bs, Hkv, D]
    num_heads, num_kv_heads = q.shape[1], keys.shape[2]
    group = num_heads // num_kv_heads
    u, block_size = where.seen.shape
    if where.present is not None:
        padded = q.new_zeros(u, block_size, num_heads, q.shape[-1])
        padded[where.inverse, where.offset] = q
        qg = padded.view(u, block_size, num_kv_heads, group, -1)
        scores = torch.einsum("uqhgd,ukhd->uhgqk", qg, keys) * scale  # [U, Hkv, G, bs, bs]
        probs = scores.masked_fill(~where.visible, float("-inf")).softmax(-1)
        # rows of absent queries may have met keys never written (staging is not zeroed): NaN there
        probs = torch.where(where.present[:, None, None, :, None], probs, 0.0)
        return probs.sum((1, 2, 3))  # [U, bs]
    qg = q.view(q.shape[0], num_kv_heads, group, -1)
    scores = torch.einsum("vhgd,vkhd->vhgk", qg, keys[where.inverse]) * scale  # [V, Hkv, G, bs]
    mask = ~where.visible[:, None, None, :]
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1).sum((1, 2))  # [V, bs]
    return torch.zeros(u, block_size).index_add_(0, where.inverse, probs)


def block_attention(
    query: torch.Tensor,  # [T, num_heads, head_size], post-RoPE, the step's tokens
    staging_key: torch.Tensor,  # [num_slots, block_size, num_kv_heads, head_size] 16-bit
    slot_of_block: torch.Tensor,  # [num_blocks] int64, the staging slot of each open block
    slot_mapping: torch.Tensor,  # [T] int64 vLLM slots (-1 = padding)
    block_size: int,
    scale: float,
):
    """`locate` then `attend`, for one layer alone: -> (staging slots [U], received, seen [U, bs])."""
    where = locate(slot_of_block, slot_mapping, block_size, query.shape[1])
    if where is None:
        empty = torch.zeros(0, block_size)
        return torch.zeros(0, dtype=torch.int64), empty, empty.clone()
    return where.unique, attend(query, staging_key, where, scale), where.seen


def block_attention_ref(query, staging_key, slot_of_block, slot_mapping, block_size, scale):
    """The oracle: one token at a time. -> {staging slot: (received [bs], seen [bs])}."""
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        staged, offset = int(slot_of_block[slot // block_size]), slot % block_size
        received, seen = out.setdefault(staged, (torch.zeros(block_size), torch.zeros(block_size)))
        keys = staging_key[staged, : offset + 1].float()  # [offset+1, Hkv, D]
        group = query.shape[1] // keys.shape[1]
        for h in range(query.shape[1]):
            p = (keys[:, h // group] @ query[t, h].float() * scale).softmax(0)
            received[: offset + 1] += p
            seen[: offset + 1] += 1
    return out
