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

Two shapes of the same computation: a prefill step has many queries per block, so queries are laid
out per block and multiplied with the block's keys at once; a decode step has one query per block,
so each query meets its own block's keys. `block_attention_ref` is the oracle (a loop per token).
"""

from __future__ import annotations

import torch


def block_attention(
    query: torch.Tensor,  # [T, num_heads, head_size], post-RoPE, the step's tokens
    staging_key: torch.Tensor,  # [num_slots, block_size, num_kv_heads, head_size] 16-bit
    slot_of_block: torch.Tensor,  # [num_blocks] int64, the staging slot of each open block
    slot_mapping: torch.Tensor,  # [T] int64 vLLM slots (-1 = padding)
    block_size: int,
    scale: float,
):
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    q = query[: slot_mapping.numel()][valid].float()  # [V, H, D]
    if slots.numel() == 0:
        empty = torch.zeros(0, block_size)
        return torch.zeros(0, dtype=torch.int64), empty, empty.clone()
    staged = slot_of_block[slots // block_size]  # [V]
    offset = slots % block_size  # [V]
    unique, inverse = torch.unique(staged, return_inverse=True)  # [U], [V]
    keys = staging_key[unique].float()  # [U, bs, Hkv, D]
    num_heads, num_kv_heads = q.shape[1], keys.shape[2]
    group = num_heads // num_kv_heads
    positions = torch.arange(block_size)
    if q.shape[0] * 4 >= unique.numel() * block_size:  # prefill-shaped: queries laid out per block
        padded = q.new_zeros(unique.numel(), block_size, num_heads, q.shape[-1])
        present = torch.zeros(unique.numel(), block_size, dtype=torch.bool)
        padded[inverse, offset] = q
        present[inverse, offset] = True
        qg = padded.view(unique.numel(), block_size, num_kv_heads, group, -1)
        scores = torch.einsum("uqhgd,ukhd->uhgqk", qg, keys) * scale  # [U, Hkv, G, bs, bs]
        visible = positions[None, :] <= positions[:, None]  # [q, k]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        # rows of absent queries may have met keys never written (staging is not zeroed): NaN there
        probs = torch.where(present[:, None, None, :, None], probs, 0.0)
        received = probs.sum((1, 2, 3))  # [U, bs]
        seen = (visible[None] & present[:, :, None]).sum(1).float() * num_heads  # [U, bs]
        return unique, received, seen
    # decode-shaped: one query (or a few) per block
    qg = q.view(q.shape[0], num_kv_heads, group, -1)
    scores = torch.einsum("vhgd,vkhd->vhgk", qg, keys[inverse]) * scale  # [V, Hkv, G, bs]
    visible = positions[None, :] <= offset[:, None]  # [V, bs]
    probs = scores.masked_fill(~visible[:, None, None, :], float("-inf")).softmax(-1).sum((1, 2))  # [V, bs]
    received = torch.zeros(unique.numel(), block_size).index_add_(0, inverse, probs)
    seen = torch.zeros(unique.numel(), block_size).index_add_(0, inverse, visible.float() * num_heads)
    return unique, received, seen


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
