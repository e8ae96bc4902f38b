"""Triton decode attention over mixed-precision pages and FP16 staging (split-K / flash-decoding).

Numerical contract: `attention_ref.paged_attention_ref` (the fp32 oracle). Every query token is
served independently with its causal context, so any query_len works (decode is query_len == 1; a
long prefill re-reads its context once per query token and is better served by a prefill kernel).

    grid (num_tokens, num_kv_heads, num_splits)                 grid (num_tokens, num_heads)
    +-------------------------------------------+               +------------------------------+
    | program (t, kv head, split): the blocks   |  partial outs | combine the splits with      |
    | [split*bps, (split+1)*bps) of t's context | ------------> | their log-sum-exp, unrotate  |
    | for the GQA group's query heads           |  + lse        | the rotated part -> out      |
    +-------------------------------------------+               +------------------------------+

Per block: a staged (open) block is read from the FP16 staging tensors; a sealed one from its page.
Record offsets follow from the page's bit map alone (`triton_seal.page_layout_of_head`: per head
region, key records then value records, each ordered by precision code then token position). A
quantized record decodes in the rotated space, y_i = LEVELS[bits][code_i] * scale (bit-exact with
quant.reference.dequantize: one fp32 multiply); 16-bit records and staging are read as they are.

Rotation (quant/rotation.py: unrotate(y) = y H 2**(k-m), H symmetric) is moved off the keys and
values: a quantized key scores q . unrotate(y) = (q H 2**(k-m)) . y, so each program transforms its
query once (`fwht_rows`, the oracle's butterflies in the oracle's order) and dots quantized keys with
it, other keys with q. Quantized values are accumulated in the rotated space apart from the plain
ones; the reduce kernel unrotates that sum once per query head and adds the plain sum. Scores,
softmax and the value sums run in fp32 (elementwise products, no tensor-core dot), so the result
differs from the oracle's (which unrotates every record) only by fp32 rounding order.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from adakv_vllm.kernels.page_codec import PageCodec
from adakv_vllm.kernels.triton_seal import (
    FP16_CODE,
    by_code,
    codebook_table,
    layout_constexprs,
    page_layout_of_head,
)
from adakv_vllm.quant import format as fmt
from adakv_vllm.quant.rotation import hadamard_block, scale_exponents

# A split covers at least this many blocks: fewer would spend more on the reduction than it saves.
MIN_BLOCKS_PER_SPLIT = 4
# Without a GPU to size the grid for (interpreter runs), use at most this many splits.
DEFAULT_SPLITS_CPU = 4
# Warps of the split kernel. Compiled for sm_90 (Triton 3.9, SmolLM2 shapes; cuobjdump
# --dump-resource-usage), 4 warps need 255 registers + 80 B of stack per thread; 8 warps need 191 and
# spill nothing.
SPLIT_NUM_WARPS = 8


def rotation_constexprs(head_size: int) -> dict[str, int | float]:
    """LOG_BLOCK (butterfly stages of rotation.fwht) and UNROTATE_SCALE (2**(k-m), a power of two)."""
    k, m = scale_exponents(head_size)
    assert hadamard_block(head_size) == 1 << m
    return {"LOG_BLOCK": m, "UNROTATE_SCALE": 2.0 ** (k - m)}


@triton.jit
def fwht_rows(x, ROWS: tl.constexpr, D_PAD: tl.constexpr, LOG_BLOCK: tl.constexpr):
    """rotation.fwht of every row of x: [ROWS, D_PAD] fp32 -> [ROWS, D_PAD] fp32, bit-exact.

    Stage h = 1, 2, .., 2**(LOG_BLOCK-1) maps (x[i], x[i+h]) -> (x[i] + x[i+h], x[i] - x[i+h]) in
    every run of 2h channels, as the oracle does; runs never cross a Hadamard block, so channels
    padded past head_size (a multiple of the block) only meet each other.
    """
    for stage in tl.static_range(LOG_BLOCK):
        runs = tl.reshape(x, (ROWS, D_PAD // (2 << stage), 2, 1 << stage))  # [.., run, half, i]
        a, b = tl.split(tl.permute(runs, (0, 1, 3, 2)))  # x[i], x[i+h]: [ROWS, run, h]
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (ROWS, D_PAD))
    return x


@triton.jit
def _dequantize_tile(
    page8,  # uint8 page start
    page16,  # the same page as the storage dtype (16-bit records)
    page_f16,  # the same page as fp16 (scales)
    tables_ptr,  # fp32 triton_seal.codebook_table
    codes,  # [BS_PAD] int32 precision codes
    offsets,  # [BS_PAD] int32 record offsets from the page start (even: format.py)
    BS_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BITS_0: tl.constexpr,
    BITS_1: tl.constexpr,
    BITS_2: tl.constexpr,
    BITS_3: tl.constexpr,
    CODE_MASK_0: tl.constexpr,
    CODE_MASK_1: tl.constexpr,
    CODE_MASK_2: tl.constexpr,
    CODE_MASK_3: tl.constexpr,
    SCALES_OFF_0: tl.constexpr,
    SCALES_OFF_1: tl.constexpr,
    SCALES_OFF_2: tl.constexpr,
    SCALES_OFF_3: tl.constexpr,
    LEVELS_AT_0: tl.constexpr,
    LEVELS_AT_1: tl.constexpr,
    LEVELS_AT_2: tl.constexpr,
    LEVELS_AT_3: tl.constexpr,
):
    """-> [BS_PAD, D_PAD] fp32: every token's record of one part (keys or values), decoded; rows of
    quantized records in the rotated space, rows of 16-bit records as stored."""
    d = tl.arange(0, D_PAD)[None, :]
    in_head = d < HEAD_SIZE
    quantized = (codes < FP16_CODE)[:, None] & in_head
    bits = by_code(codes, BITS_0, BITS_1, BITS_2, BITS_3, 0)[:, None]
    pos = d * bits  # element d at bits [d*bits, (d+1)*bits) of the record's little-endian code stream
    at = page8 + offsets[:, None] + (pos >> 3)
    shift = pos & 7
    low = tl.load(at, mask=quantized, other=0).to(tl.int32)
    high = tl.load(at + 1, mask=quantized & (shift + bits > 8), other=0).to(tl.int32)  # 3-bit straddles
    code_mask = by_code(codes, CODE_MASK_0, CODE_MASK_1, CODE_MASK_2, CODE_MASK_3, 0)[:, None]
    q = ((low | (high << 8)) >> shift) & code_mask
    table = by_code(codes, LEVELS_AT_0, LEVELS_AT_1, LEVELS_AT_2, LEVELS_AT_3, 0)[:, None]
    level = tl.load(tables_ptr + table + q, mask=quantized, other=0.0)
    # fp16 element index (byte offset // 2) of element d's group scale
    scales_at = (offsets + by_code(codes, SCALES_OFF_0, SCALES_OFF_1, SCALES_OFF_2, SCALES_OFF_3, 0)) // 2
    scale = tl.load(page_f16 + scales_at[:, None] + d // GROUP_SIZE, mask=quantized, other=0.0)
    exact = (codes == FP16_CODE)[:, None] & in_head
    x16 = tl.load(page16 + offsets[:, None] // 2 + d, mask=exact, other=0.0).to(tl.float32)
    return tl.where(quantized, level * scale.to(tl.float32), x16)


@triton.jit
def _split_kernel(
    q_ptr,  # [T, H, D] query
    stride_qt,
    stride_qh,
    pages_ptr,  # [num_blocks, page_bytes] uint8
    pages16_ptr,  # the same bytes as the storage dtype
    pages_f16_ptr,  # the same bytes as fp16
    stride_page,  # bytes
    tables_ptr,  # fp32 codebook_table
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
    partial_rot_ptr,  # [T, H, num_splits, D] fp32: the split's output part still to be unrotated
    partial_plain_ptr,  # [T, H, num_splits, D] fp32: its plain part
    lse_ptr,  # [T, H, num_splits] fp32
    scale,
    blocks_per_split,
    num_splits,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    LOG_BLOCK: tl.constexpr,
    UNROTATE_SCALE: tl.constexpr,
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
    REC_BYTES_4: tl.constexpr,
    BITS_0: tl.constexpr,
    BITS_1: tl.constexpr,
    BITS_2: tl.constexpr,
    BITS_3: tl.constexpr,
    CODE_MASK_0: tl.constexpr,
    CODE_MASK_1: tl.constexpr,
    CODE_MASK_2: tl.constexpr,
    CODE_MASK_3: tl.constexpr,
    SCALES_OFF_0: tl.constexpr,
    SCALES_OFF_1: tl.constexpr,
    SCALES_OFF_2: tl.constexpr,
    SCALES_OFF_3: tl.constexpr,
    LEVELS_AT_0: tl.constexpr,
    LEVELS_AT_1: tl.constexpr,
    LEVELS_AT_2: tl.constexpr,
    LEVELS_AT_3: tl.constexpr,
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
    q_rot = fwht_rows(q, GROUP_PAD, D_PAD, LOG_BLOCK) * UNROTATE_SCALE  # q . unrotate(y) == q_rot . y
    kv_mask = (t < BLOCK_SIZE)[:, None] & (d < HEAD_SIZE)[None, :]

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc_rot = tl.zeros([GROUP_PAD, D_PAD], tl.float32)  # sum of p * y over quantized values
    acc_plain = tl.zeros([GROUP_PAD, D_PAD], tl.float32)  # sum of p * v over 16-bit and staged values
    for b in range(first, last):
        block = tl.load(block_table_ptr + seq * stride_bt + b).to(tl.int64)
        slot = tl.load(staging_slot_ptr + block)
        if slot >= 0:  # open block: exact 16-bit K/V
            sk = staging_key_ptr + slot * stride_sk_slot + kv_head * stride_sk_h
            sv = staging_value_ptr + slot * stride_sv_slot + kv_head * stride_sv_h
            k = tl.load(sk + t[:, None] * stride_sk_t + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(sv + t[:, None] * stride_sv_t + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            key_rotated = t < 0
            value_rotated = t < 0
        else:
            page = block * stride_page
            key_codes, value_codes, key_off, value_off, region = page_layout_of_head(
                pages_ptr + page, kv_head, HEADER_BYTES, BLOCK_SIZE, BS_PAD,
                REC_BYTES_0, REC_BYTES_1, REC_BYTES_2, REC_BYTES_3, REC_BYTES_4,
            )  # fmt: skip
            k = _dequantize_tile(
                pages_ptr + page, pages16_ptr + page // 2, pages_f16_ptr + page // 2, tables_ptr,
                key_codes, key_off, BS_PAD, HEAD_SIZE, D_PAD, GROUP_SIZE,
                BITS_0, BITS_1, BITS_2, BITS_3, CODE_MASK_0, CODE_MASK_1, CODE_MASK_2, CODE_MASK_3,
                SCALES_OFF_0, SCALES_OFF_1, SCALES_OFF_2, SCALES_OFF_3,
                LEVELS_AT_0, LEVELS_AT_1, LEVELS_AT_2, LEVELS_AT_3,
            )  # fmt: skip
            v = _dequantize_tile(
                pages_ptr + page, pages16_ptr + page // 2, pages_f16_ptr + page // 2, tables_ptr,
                value_codes, value_off, BS_PAD, HEAD_SIZE, D_PAD, GROUP_SIZE,
                BITS_0, BITS_1, BITS_2, BITS_3, CODE_MASK_0, CODE_MASK_1, CODE_MASK_2, CODE_MASK_3,
                SCALES_OFF_0, SCALES_OFF_1, SCALES_OFF_2, SCALES_OFF_3,
                LEVELS_AT_0, LEVELS_AT_1, LEVELS_AT_2, LEVELS_AT_3,
            )  # fmt: skip
            key_rotated = key_codes < FP16_CODE
            value_rotated = value_codes < FP16_CODE
        q_sel = tl.where(key_rotated[None, :, None], q_rot[:, None, :], q[:, None, :])
        s = tl.sum(q_sel * k[None, :, :], axis=2) * scale  # [GROUP_PAD, BS_PAD]
        visible = (t < BLOCK_SIZE) & (b * BLOCK_SIZE + t < context)
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p_rot = tl.where(value_rotated[None, :], p, 0.0)
        acc_rot = acc_rot * alpha[:, None] + tl.sum(p_rot[:, :, None] * v[None, :, :], axis=1)
        acc_plain = acc_plain * alpha[:, None] + tl.sum((p - p_rot)[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new

    has_keys = l_i > 0  # false only for a split past the end of this token's context
    norm = tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    row = tok * NUM_HEADS + heads  # [GROUP_PAD]
    tl.store(lse_ptr + row * num_splits + split, lse, mask=g < GROUP)
    at = (row[:, None] * num_splits + split) * HEAD_SIZE + d[None, :]
    tl.store(partial_rot_ptr + at, acc_rot / norm, mask=q_mask)
    tl.store(partial_plain_ptr + at, acc_plain / norm, mask=q_mask)


@triton.jit
def _reduce_kernel(
    partial_rot_ptr,  # [T, H, num_splits, D] fp32
    partial_plain_ptr,  # [T, H, num_splits, D] fp32
    lse_ptr,  # [T, H, num_splits] fp32
    out_ptr,  # [T, H, D]
    stride_ot,
    stride_oh,
    num_splits,
    NUM_HEADS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    D_PAD: tl.constexpr,
    LOG_BLOCK: tl.constexpr,
    UNROTATE_SCALE: tl.constexpr,
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
    total = tl.where(owned, tl.sum(w, axis=0), 1.0)
    mask = (sp < num_splits)[:, None] & (d < HEAD_SIZE)[None, :]
    at = (row * num_splits + sp[:, None]) * HEAD_SIZE + d[None, :]
    rot = tl.sum(w[:, None] * tl.load(partial_rot_ptr + at, mask=mask, other=0.0), axis=0) / total
    plain = tl.sum(w[:, None] * tl.load(partial_plain_ptr + at, mask=mask, other=0.0), axis=0) / total
    unrotated = tl.reshape(fwht_rows(tl.reshape(rot, (1, D_PAD)), 1, D_PAD, LOG_BLOCK), (D_PAD,))
    out = unrotated * UNROTATE_SCALE + plain
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

    partial_rot = torch.empty(num_tokens, num_heads, splits, head_size, dtype=torch.float32, device=device)
    partial_plain = torch.empty_like(partial_rot)
    lse = torch.empty(num_tokens, num_heads, splits, dtype=torch.float32, device=device)
    rotation = rotation_constexprs(head_size)
    _split_kernel[(num_tokens, num_kv_heads, splits)](
        query,
        query.stride(0),
        query.stride(1),
        pages,
        pages.view(codec.storage_dtype),
        pages.view(torch.float16),
        pages.stride(0),
        codebook_table(device),
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
        partial_rot,
        partial_plain,
        lse,
        scale,
        blocks_per_split,
        splits,
        NUM_HEADS=num_heads,
        GROUP=group,
        GROUP_PAD=triton.next_power_of_2(group),
        num_warps=SPLIT_NUM_WARPS,
        **rotation,
        **{k: v for k, v in layout_constexprs(layout).items() if k in _split_kernel.arg_names},
    )
    _reduce_kernel[(num_tokens, num_heads)](
        partial_rot,
        partial_plain,
        lse,
        out,
        out.stride(0),
        out.stride(1),
        splits,
        NUM_HEADS=num_heads,
        SPLITS_PAD=triton.next_power_of_2(splits),
        HEAD_SIZE=head_size,
        D_PAD=triton.next_power_of_2(head_size),
        **rotation,
    )
    return out


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
