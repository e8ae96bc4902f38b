"""Triton decode attention over mixed-precision pages and FP16 staging (split-K / flash-decoding).

Numerical contract: `torch_ref.paged_attention_ref` (the fp32 oracle). Every query token is served
independently with its causal context, so any query_len works (decode is query_len == 1; a long
prefill re-reads its context once per query token and is better served by a prefill kernel).

    grid (num_tokens, num_kv_heads, num_splits)                 grid (num_tokens, num_heads)
    +-------------------------------------------+               +----------------------------+
    | program (t, kv head, split): the blocks   |  partial out  | combine the splits with    |
    | [split*bps, (split+1)*bps) of t's context | ------------> | their log-sum-exp -> out   |
    | for the GQA group's query heads           |  + lse        |                            |
    +-------------------------------------------+               +----------------------------+

Per block: a staged (open) block is read from the FP16 staging tensors; a sealed one from its page.
Record offsets follow from the page's bit map alone (`triton_seal.page_layout_of_head`: per head
region, key records then value records, each ordered by precision code then token position); a
quantized element is `code * scale + min` with fp16 scale/min per group, a 16-bit record is read in
the storage dtype. With rotate_keys the quantized key records hold K R, so their scores use q R
(computed before the launch); 16-bit records and staged keys use q. Scores, softmax and the value
sum run in fp32 (elementwise products, no tensor-core dot), so the result differs from the oracle
only by summation order and the fused multiply-adds of the dequantization.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from adakv_vllm.kernels.page_codec import PageCodec
from adakv_vllm.kernels.triton_seal import FP16_CODE, by_code, layout_constexprs, page_layout_of_head
from adakv_vllm.quant import format as fmt
from adakv_vllm.quant.rotation import rotation_matrix

# A split covers at least this many blocks: fewer would spend more on the reduction than it saves.
MIN_BLOCKS_PER_SPLIT = 4
# Without a GPU to size the grid for (interpreter runs), use at most this many splits.
DEFAULT_SPLITS_CPU = 4
# Warps of the split kernel. Compiled for sm_90 (Triton 3.9, SmolLM2 shapes), 4 warps need 255
# registers + 240 B of spills per thread; 8 warps need 202 and spill nothing.
SPLIT_NUM_WARPS = 8


@triton.jit
def _dequantize_tile(
    page8,  # uint8 page start
    page16,  # the same page as the storage dtype (16-bit records)
    page_f16,  # the same page as fp16 (scales and mins)
    codes,  # [BS_PAD] int32 precision codes
    offsets,  # [BS_PAD] int32 record offsets from the page start (even: format.py)
    BS_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BITS_0: tl.constexpr,
    BITS_1: tl.constexpr,
    BITS_2: tl.constexpr,
    SCALES_OFF_0: tl.constexpr,
    SCALES_OFF_1: tl.constexpr,
    SCALES_OFF_2: tl.constexpr,
    MINS_OFF_0: tl.constexpr,
    MINS_OFF_1: tl.constexpr,
    MINS_OFF_2: tl.constexpr,
):
    """-> [BS_PAD, D_PAD] fp32: every token's record of one part (keys or values), decoded."""
    d = tl.arange(0, D_PAD)[None, :]
    in_head = d < HEAD_SIZE
    quantized = (codes < FP16_CODE)[:, None] & in_head
    bits = by_code(codes, BITS_0, BITS_1, BITS_2, 16)[:, None]
    pos = d * bits  # first bit of element d; element j of a byte sits at bits [j*bits, (j+1)*bits)
    byte = tl.load(page8 + offsets[:, None] + (pos >> 3), mask=quantized, other=0).to(tl.int32)
    q = (byte >> (pos & 7)) & ((1 << bits) - 1)
    # fp16 element index (byte offset // 2) of element d's group scale and min
    scales_at = (offsets + by_code(codes, SCALES_OFF_0, SCALES_OFF_1, SCALES_OFF_2, 0)) // 2
    mins_at = (offsets + by_code(codes, MINS_OFF_0, MINS_OFF_1, MINS_OFF_2, 0)) // 2
    group = d // GROUP_SIZE
    scale = tl.load(page_f16 + scales_at[:, None] + group, mask=quantized, other=0.0).to(tl.float32)
    low = tl.load(page_f16 + mins_at[:, None] + group, mask=quantized, other=0.0).to(tl.float32)
    exact = (codes == FP16_CODE)[:, None] & in_head
    x16 = tl.load(page16 + offsets[:, None] // 2 + d, mask=exact, other=0.0).to(tl.float32)
    return tl.where(quantized, q.to(tl.float32) * scale + low, x16)


@triton.jit
def _split_kernel(
    q_ptr,  # [T, H, D] query
    q_rot_ptr,  # [T, H, D] fp32 query @ R (read only with ROTATE_KEYS)
    stride_qt,
    stride_qh,
    stride_rt,
    stride_rh,
    pages_ptr,  # [num_blocks, page_bytes] uint8
    pages16_ptr,  # the same bytes as the storage dtype
    pages_f16_ptr,  # the same bytes as fp16
    stride_page,  # bytes
    staging_key_ptr,  # [num_slots, block_size, num_kv_heads, D]
    staging_value_ptr,
    stride_sk_slot,
    stride_sk_t,
    stride_sk_h,
    stride_sv_slot,
    stride_sv_t,
    stride_sv_h,
    staging_slot_ptr,  # [num_blocks] int64, -1 = sealed
    block_table_ptr,  # [num_seqs, max_blocks]
    stride_bt,
    query_start_loc_ptr,  # [num_seqs + 1]
    seq_lens_ptr,  # [num_seqs]
    num_seqs,
    partial_out_ptr,  # [T, H, num_splits, D] fp32
    lse_ptr,  # [T, H, num_splits] fp32
    scale,
    blocks_per_split,
    num_splits,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    ROTATE_KEYS: tl.constexpr,
    HEADER_BYTES: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BS_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    REC_BYTES_0: tl.constexpr,
    REC_BYTES_1: tl.constexpr,
    REC_BYTES_2: tl.constexpr,
    REC_BYTES_3: tl.constexpr,
    BITS_0: tl.constexpr,
    BITS_1: tl.constexpr,
    BITS_2: tl.constexpr,
    SCALES_OFF_0: tl.constexpr,
    SCALES_OFF_1: tl.constexpr,
    SCALES_OFF_2: tl.constexpr,
    MINS_OFF_0: tl.constexpr,
    MINS_OFF_1: tl.constexpr,
    MINS_OFF_2: tl.constexpr,
):
    tok = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # This token's sequence: the last s with query_start_loc[s] <= tok (bisection; empty sequences
    # are skipped because a later one starts at the same token). Past query_start_loc[num_seqs]:
    # a padding token, no keys at all.
    lo = 0
    hi = num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) <= tok:
            lo = mid
        else:
            hi = mid
    seq = lo
    start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - start
    # the j-th query of the sequence sits at position seq_len - q_len + j and sees keys 0..position
    context = tl.load(seq_lens_ptr + seq) - q_len + (tok - start) + 1
    context = tl.where(tok < tl.load(query_start_loc_ptr + num_seqs), context, 0)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(context, BLOCK_SIZE))

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    t = tl.arange(0, BS_PAD)
    heads = kv_head * GROUP + g  # [GROUP_PAD] query heads of this KV head
    q_mask = (g < GROUP)[:, None] & (d < HEAD_SIZE)[None, :]
    q = tl.load(q_ptr + tok * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    q = q.to(tl.float32)  # [GROUP_PAD, D_PAD]
    if ROTATE_KEYS:
        q_rot = tl.load(
            q_rot_ptr + tok * stride_rt + heads[:, None] * stride_rh + d[None, :], mask=q_mask, other=0.0
        )
    kv_mask = (t < BLOCK_SIZE)[:, None] & (d < HEAD_SIZE)[None, :]

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    for b in range(first, last):
        block = tl.load(block_table_ptr + seq * stride_bt + b).to(tl.int64)
        slot = tl.load(staging_slot_ptr + block)
        if slot >= 0:  # open block: exact 16-bit K/V, keys never rotated
            sk = staging_key_ptr + slot * stride_sk_slot + kv_head * stride_sk_h
            sv = staging_value_ptr + slot * stride_sv_slot + kv_head * stride_sv_h
            k = tl.load(sk + t[:, None] * stride_sk_t + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(sv + t[:, None] * stride_sv_t + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            key_rotated = t < 0
        else:
            page = block * stride_page
            key_codes, value_codes, key_off, value_off, region = page_layout_of_head(
                pages_ptr + page, kv_head, HEADER_BYTES, BLOCK_SIZE, BS_PAD,
                REC_BYTES_0, REC_BYTES_1, REC_BYTES_2, REC_BYTES_3,
            )  # fmt: skip
            k = _dequantize_tile(
                pages_ptr + page, pages16_ptr + page // 2, pages_f16_ptr + page // 2, key_codes, key_off,
                BS_PAD, HEAD_SIZE, D_PAD, GROUP_SIZE, BITS_0, BITS_1, BITS_2,
                SCALES_OFF_0, SCALES_OFF_1, SCALES_OFF_2, MINS_OFF_0, MINS_OFF_1, MINS_OFF_2,
            )  # fmt: skip
            v = _dequantize_tile(
                pages_ptr + page, pages16_ptr + page // 2, pages_f16_ptr + page // 2, value_codes, value_off,
                BS_PAD, HEAD_SIZE, D_PAD, GROUP_SIZE, BITS_0, BITS_1, BITS_2,
                SCALES_OFF_0, SCALES_OFF_1, SCALES_OFF_2, MINS_OFF_0, MINS_OFF_1, MINS_OFF_2,
            )  # fmt: skip
            key_rotated = key_codes < FP16_CODE
        if ROTATE_KEYS:
            q_sel = tl.where(key_rotated[None, :, None], q_rot[:, None, :], q[:, None, :])
            s = tl.sum(q_sel * k[None, :, :], axis=2)  # [GROUP_PAD, BS_PAD]
        else:
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        s = s * scale
        visible = (t < BLOCK_SIZE) & (b * BLOCK_SIZE + t < context)
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new

    has_keys = l_i > 0  # false only for a split past the end of this token's context
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    row = tok * NUM_HEADS + heads  # [GROUP_PAD]
    tl.store(lse_ptr + row * num_splits + split, lse, mask=g < GROUP)
    po = partial_out_ptr + (row[:, None] * num_splits + split) * HEAD_SIZE + d[None, :]
    tl.store(po, out, mask=q_mask)


@triton.jit
def _reduce_kernel(
    partial_out_ptr,  # [T, H, num_splits, D] fp32
    lse_ptr,  # [T, H, num_splits] fp32
    out_ptr,  # [T, H, D]
    stride_ot,
    stride_oh,
    num_splits,
    NUM_HEADS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    D_PAD: tl.constexpr,
):
    tok = tl.program_id(0)
    head = tl.program_id(1)
    row = tok * NUM_HEADS + head
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    lse = tl.load(lse_ptr + row * num_splits + sp, mask=sp < num_splits, other=float("-inf"))
    m = tl.max(lse, axis=0)  # -inf only for a padding token (no keys at all)
    owned = m > float("-inf")
    w = tl.exp(lse - tl.where(owned, m, 0.0))  # [SPLITS_PAD], 0 for empty splits
    mask = (sp < num_splits)[:, None] & (d < HEAD_SIZE)[None, :]
    po = tl.load(
        partial_out_ptr + (row * num_splits + sp[:, None]) * HEAD_SIZE + d[None, :], mask=mask, other=0.0
    )
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * po, axis=0) / tl.where(owned, total, 1.0)
    dst = out_ptr + tok * stride_ot + head * stride_oh + d
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=d < tl.where(owned, HEAD_SIZE, 0))


def paged_attention_triton(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size] fp16/bf16/fp32
    pages: torch.Tensor,  # [num_blocks, page_bytes] uint8 (one layer; rows may be strided)
    staging_key: torch.Tensor,  # [num_slots, block_size, num_kv_heads, head_size] 16-bit
    staging_value: torch.Tensor,  # [num_slots, block_size, num_kv_heads, head_size] 16-bit
    staging_slot: torch.Tensor,  # [num_blocks] int64, -1 = sealed (read the page)
    block_table: torch.Tensor,  # [num_seqs, max_blocks] int32/int64
    seq_lens: torch.Tensor,  # [num_seqs] int32/int64
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32/int64
    codec: PageCodec,
    scale: float,
    *,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_size] any float dtype
    num_splits: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """`paged_attention_ref`'s contract, fused: -> out (fp32 [num_tokens, num_heads, head_size] if
    not given). All tensors on one device (CPU only under TRITON_INTERPRET=1). `max_seq_len` (the
    largest seq_lens entry, vLLM's metadata has it) saves a device sync; `num_splits` overrides the
    grid's split count."""
    layout = codec.layout
    num_tokens, num_heads, head_size = _check_inputs(
        query, pages, staging_key, staging_value, staging_slot, block_table, seq_lens, query_start_loc, layout
    )
    if codec.storage_dtype not in fmt.STORAGE_DTYPES:
        raise ValueError(
            f"codec.storage_dtype must be one of {fmt.STORAGE_DTYPES}, got {codec.storage_dtype}"
        )
    if out is None:
        out = torch.empty(num_tokens, num_heads, head_size, dtype=torch.float32, device=query.device)
    elif out.shape != query.shape or not out.is_floating_point() or out.stride(2) != 1:
        raise ValueError(f"out must be a float tensor of shape {list(query.shape)} with contiguous rows")
    if num_tokens == 0 or seq_lens.shape[0] == 0:  # nothing to attend: every token is padding
        return out
    device = query.device
    num_kv_heads = layout.num_kv_heads
    group = num_heads // num_kv_heads

    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    max_blocks = max(1, math.ceil(max_seq_len / layout.block_size))
    splits = (
        num_splits
        if num_splits is not None
        else _default_splits(device, num_tokens * num_kv_heads, max_blocks)
    )
    if splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {splits}")
    blocks_per_split = math.ceil(max_blocks / splits)
    splits = math.ceil(max_blocks / blocks_per_split)  # no split starts past every context

    q_rot = query
    if codec.rotate_keys:
        q_rot = query.float() @ _rotation_on(head_size, device)  # [T, H, D] fp32
    partial_out = torch.empty(num_tokens, num_heads, splits, head_size, dtype=torch.float32, device=device)
    lse = torch.empty(num_tokens, num_heads, splits, dtype=torch.float32, device=device)
    _split_kernel[(num_tokens, num_kv_heads, splits)](
        query,
        q_rot,
        query.stride(0),
        query.stride(1),
        q_rot.stride(0),
        q_rot.stride(1),
        pages,
        pages.view(codec.storage_dtype),
        pages.view(torch.float16),
        pages.stride(0),
        staging_key,
        staging_value,
        staging_key.stride(0),
        staging_key.stride(1),
        staging_key.stride(2),
        staging_value.stride(0),
        staging_value.stride(1),
        staging_value.stride(2),
        staging_slot,
        block_table,
        block_table.stride(0),
        query_start_loc,
        seq_lens,
        seq_lens.shape[0],
        partial_out,
        lse,
        scale,
        blocks_per_split,
        splits,
        NUM_HEADS=num_heads,
        GROUP=group,
        GROUP_PAD=triton.next_power_of_2(group),
        ROTATE_KEYS=codec.rotate_keys,
        num_warps=SPLIT_NUM_WARPS,
        **{k: v for k, v in layout_constexprs(layout).items() if k in _split_kernel.arg_names},
    )
    _reduce_kernel[(num_tokens, num_heads)](
        partial_out,
        lse,
        out,
        out.stride(0),
        out.stride(1),
        splits,
        NUM_HEADS=num_heads,
        SPLITS_PAD=triton.next_power_of_2(splits),
        HEAD_SIZE=head_size,
        D_PAD=triton.next_power_of_2(head_size),
    )
    return out


@functools.cache
def _rotation_on(head_size: int, device: torch.device) -> torch.Tensor:
    return rotation_matrix(head_size).to(device)


def _default_splits(device: torch.device, programs: int, max_blocks: int) -> int:
    """Enough splits to give every multiprocessor two programs, none shorter than MIN_BLOCKS_PER_SPLIT."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        want = math.ceil(target / max(programs, 1))
    else:
        want = DEFAULT_SPLITS_CPU
    return max(1, min(want, math.ceil(max_blocks / MIN_BLOCKS_PER_SPLIT)))


def _check_inputs(query, pages, staging_key, staging_value, staging_slot, block_table, seq_lens, qsl, layout):
    """ValueError naming what is allowed. -> (num_tokens, num_heads, head_size)."""
    if query.ndim != 3 or query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            "query must be [num_tokens, num_heads, head_size] fp16/bf16/fp32, "
            f"got {query.dtype} {list(query.shape)}"
        )
    num_tokens, num_heads, head_size = query.shape
    h, d, bs = layout.num_kv_heads, layout.record.head_size, layout.block_size
    if head_size != d or query.stride(2) != 1:
        raise ValueError(f"query head_size must be the layout's {d} with contiguous rows, got {head_size}")
    if num_heads % h:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({h})")
    if pages.dtype != torch.uint8 or pages.ndim != 2 or pages.shape[1] < layout.page_bytes:
        raise ValueError(
            f"pages must be uint8 [num_blocks, >= {layout.page_bytes}], got {pages.dtype} {list(pages.shape)}"
        )
    if pages.stride(1) != 1 or pages.stride(0) % 2 or pages.data_ptr() % 2:
        raise ValueError("pages rows must be contiguous and 2-byte aligned (16-bit records, fp16 params)")
    for name, s in (("staging_key", staging_key), ("staging_value", staging_value)):
        if s.ndim != 4 or tuple(s.shape[1:]) != (bs, h, d) or s.stride(3) != 1:
            raise ValueError(
                f"{name} must be [num_slots, {bs}, {h}, {d}] with contiguous rows, got {list(s.shape)}"
            )
        if s.dtype not in fmt.STORAGE_DTYPES:
            raise ValueError(f"{name} dtype must be one of {fmt.STORAGE_DTYPES}, got {s.dtype}")
    if staging_slot.shape != (pages.shape[0],) or staging_slot.dtype != torch.int64:
        raise ValueError(
            f"staging_slot must be int64 [num_blocks={pages.shape[0]}], "
            f"got {staging_slot.dtype} {list(staging_slot.shape)}"
        )
    num_seqs = seq_lens.shape[0] if seq_lens.ndim == 1 else -1
    if (
        num_seqs < 0
        or qsl.shape != (num_seqs + 1,)
        or block_table.ndim != 2
        or block_table.shape[0] < num_seqs
    ):
        raise ValueError(
            "need seq_lens [num_seqs], query_start_loc [num_seqs + 1], block_table [>= num_seqs, max_blocks]"
        )
    for name, x in (("block_table", block_table), ("seq_lens", seq_lens), ("query_start_loc", qsl)):
        if x.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {x.dtype}")
    if block_table.stride(1) != 1:
        raise ValueError("block_table rows must be contiguous")
    tensors = (query, pages, staging_key, staging_value, staging_slot, block_table, seq_lens, qsl)
    if len({x.device for x in tensors}) != 1:
        raise ValueError("all tensors must be on one device")
    return num_tokens, num_heads, head_size
