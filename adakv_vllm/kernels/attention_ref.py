"""The fp32 oracle of paged attention over mixed-precision pages and FP16 staging.

Every fast attention path (CPU extension, Triton) is tested against `paged_attention_ref`. It favours
clarity over speed: each block is decoded with the page codec (itself tested bit-exact against
`quant.reference`) and attention is a plain causal softmax in fp32.

Numerical contract shared by all paths:
    sequence s owns query tokens query_start_loc[s] .. query_start_loc[s+1]-1 and seq_lens[s] keys;
    its j-th query (of q_len) sits at position seq_lens[s] - q_len + j and attends to keys 0..position;
    key/value of position p live in block block_table[s, p // block_size] at offset p % block_size:
    from staging slot staging_slot[block] when that is >= 0 (open block, exact 16-bit values),
    otherwise decoded from the sealed page pages[block];
    query head h reads KV head h // (num_heads // num_kv_heads) (GQA);
    out = softmax(scale * q . K^T) V, accumulated in fp32.
Quantized records hold rotated keys and values; the codec rotates them back, so the oracle sees the
same K/V a fused kernel sees when it rotates the query and its value accumulator instead.
"""

from __future__ import annotations

import torch

from adakv_vllm.kernels.page_codec import PageCodec


def paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    pages: torch.Tensor,  # [num_blocks, page_bytes] uint8 (one layer)
    staging_key: torch.Tensor,  # [num_slots, block_size, num_kv_heads, head_size] 16-bit
    staging_value: torch.Tensor,  # [num_slots, block_size, num_kv_heads, head_size] 16-bit
    staging_slot: torch.Tensor,  # [num_blocks] int64, -1 = sealed (read the page)
    block_table: torch.Tensor,  # [num_seqs, max_blocks] int32/int64
    seq_lens: torch.Tensor,  # [num_seqs]
    query_start_loc: torch.Tensor,  # [num_seqs + 1]
    codec: PageCodec,
    scale: float,
) -> torch.Tensor:
    """-> [num_tokens, num_heads, head_size] fp32."""
    num_heads = query.shape[1]
    num_kv_heads = codec.layout.num_kv_heads
    group = num_heads // num_kv_heads
    out = torch.zeros(query.shape, dtype=torch.float32)
    for s in range(seq_lens.numel()):
        seq_len = int(seq_lens[s])
        start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
        q_len = end - start
        if q_len == 0:
            continue
        key, value = _sequence_kv(
            pages, staging_key, staging_value, staging_slot, block_table[s], seq_len, codec
        )
        key = key.repeat_interleave(group, dim=1)  # [seq_len, num_heads, D]
        value = value.repeat_interleave(group, dim=1)
        q = query[start:end].float()  # [q_len, num_heads, D]
        scores = torch.einsum("qhd,khd->hqk", q, key) * scale  # [num_heads, q_len, seq_len]
        positions = torch.arange(seq_len - q_len, seq_len)
        visible = torch.arange(seq_len)[None, :] <= positions[:, None]  # [q_len, seq_len]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), value)
    return out


def _sequence_kv(pages, staging_key, staging_value, staging_slot, blocks, seq_len, codec):
    """-> key, value [seq_len, num_kv_heads, head_size] fp32 of one sequence."""
    bs = codec.layout.block_size
    keys, values = [], []
    for k in range((seq_len + bs - 1) // bs):
        block = int(blocks[k])
        slot = int(staging_slot[block])
        if slot >= 0:
            key, value = staging_key[slot].float(), staging_value[slot].float()
        else:
            key, value, _, _ = codec.decode(pages[block : block + 1])
            key, value = key[0], value[0]
        keys.append(key)
        values.append(value)
    return torch.cat(keys)[:seq_len], torch.cat(values)[:seq_len]
