"""Triton page sealing: quantize + pack a batch of full blocks into their pages, on the GPU.

Produces the same bytes as `PageCodec.encode` (and so as the oracle `quant.reference.pack_page`):
keys and values Hadamard-rotated, one fp16 scale per group chosen among the clip factors by squared
error, codes of the symmetric codebooks as a little-endian bit stream, 16-bit records copied verbatim,
bit map in the header, zeros everywhere else. Layout numbers come from `quant.format` and the
codebooks from `quant.levels` (one fp32 table, `codebook_table`) through `layout_constexprs`; the
kernels only implement the documented rules (records ordered by precision code then token position;
element i of a record at bits [i*bits, (i+1)*bits) of its code stream).

Grid: one program per (page, KV head). Each program reads the page's bit map, derives every record
offset of its head region (`page_layout_of_head`, shared with the decode kernel), then writes the
key records and the value records of that head; the program of head 0 also writes the header and
zeroes the slack after the last region.

Bit-exactness: the rotation is `rotation.rotate` in torch before the launch (exact butterflies: the
same bits on any IEEE device). Every fp32 step of the clip search is one IEEE-rounded operation as
in the oracle (`div_rn`, fp16 rounding to nearest even, no fused multiply-add: launched with
`enable_fp_fusion=False`), and each candidate's squared error is computed in fp64 term by term as
the oracle does. One deviation: the oracle sums a group's fp64 terms in element order, the kernel as
a tree, so the two sums may differ in their last bits; that can only change which clip factor wins
when two candidates' errors agree to a few fp64 ulps (candidates whose fp16 scales are equal have
identical errors in both and tie alike: the earliest wins). The tests' pages are byte-equal.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from adakv_vllm.kernels.page_codec import PageCodec
from adakv_vllm.quant import format as fmt
from adakv_vllm.quant import levels
from adakv_vllm.quant.precision import PRECISIONS, Precision
from adakv_vllm.quant.reference import MAX_QUANTIZED_ABS, MAX_ROTATED_ABS, check_finite
from adakv_vllm.quant.rotation import rotate

# A padded token position (block_size not a power of two) gets this code: it sorts after every
# real record and is given zero record bytes, so it never moves an offset.
PAD_CODE = tl.constexpr(15)
# The 16-bit record's code; the quantized precisions have codes 0..FP16_CODE-1 (kernels rely on it,
# and spell the four quantized classes out: by_code, the _0.._3 constexprs).
FP16_CODE = tl.constexpr(Precision.FP16.code)
_QUANTIZED = tuple(p for p in PRECISIONS if p.is_quantized)
assert [p.code for p in _QUANTIZED] == list(range(FP16_CODE.value)) and len(_QUANTIZED) == 4
# Codes are packed 8 at a time: 8 codes of `bits` bits fill exactly `bits` bytes of the stream.
CODES_PER_CHUNK = tl.constexpr(8)
# Warps of the seal kernel. Compiled for sm_90 (Triton 3.9, SmolLM2 shapes; cuobjdump
# --dump-resource-usage), 4 warps need 255 registers + 192 B of stack per thread; 8 warps need 223 and
# spill nothing. Not timed on a GPU yet (benchmarks/gpu_check.py times the seal).
SEAL_NUM_WARPS = 8


@functools.cache
def _codebook() -> tuple[torch.Tensor, dict[str, int]]:
    """levels.py's tables, concatenated into one fp32 vector, and where each table starts in it."""
    parts, at, where = [], 0, {}
    for p in _QUANTIZED:
        for name, table in (
            ("LEVELS_AT", levels.LEVELS[p.bits]),
            ("THRESH_AT", levels.THRESHOLDS[p.bits]),
            ("CLIPS_AT", levels.CLIP_FACTORS[p.bits]),
        ):
            assert table.dtype == torch.float32
            where[f"{name}_{p.code}"] = at
            parts.append(table)
            at += table.numel()
        where[f"NUM_CLIPS_{p.code}"] = levels.CLIP_FACTORS[p.bits].numel()
        where[f"NUM_LEVELS_{p.code}"] = p.levels
        where[f"ZERO_CODE_{p.code}"] = levels.zero_code(p.bits)
    return torch.cat(parts), where


@functools.cache
def codebook_table(device: torch.device) -> torch.Tensor:
    """[n] fp32 on `device`: every codebook's levels, thresholds and clip factors, exactly as in
    quant.levels; the *_AT_c entries of `layout_constexprs` index it."""
    return _codebook()[0].to(device)


def layout_constexprs(layout: fmt.PageLayout) -> dict[str, int]:
    """Every layout and codebook number the kernels need, from format.py and levels.py (each kernel
    takes the ones it names).

    Suffix _0/_1/_2/_3 = the quantized precision codes (2/3/4/8 bits), _4 = the 16-bit record.
    """
    rec = layout.record
    assert fmt.PARAM_BYTES == 2  # scales are read and written through fp16 pointers
    out = {
        "HEADER_BYTES": layout.header_bytes,
        "HEADER_PAD": triton.next_power_of_2(layout.header_bytes),
        "BLOCK_SIZE": layout.block_size,
        "BS_PAD": triton.next_power_of_2(layout.block_size),
        "HEAD_SIZE": rec.head_size,
        "D_PAD": triton.next_power_of_2(rec.head_size),
        "GROUP_SIZE": rec.group_size,
        "NUM_GROUPS": rec.num_groups,
        "NG_PAD": triton.next_power_of_2(rec.num_groups),
        f"REC_BYTES_{Precision.FP16.code}": rec.record_bytes(Precision.FP16),
        **_codebook()[1],
    }
    for p in _QUANTIZED:
        c = p.code
        out[f"REC_BYTES_{c}"] = rec.record_bytes(p)
        out[f"BITS_{c}"] = p.bits
        out[f"CODE_MASK_{c}"] = fmt.code_mask(p)
        out[f"SCALES_OFF_{c}"] = rec.scales_offset(p)
    return out


@triton.jit
def by_code(c, v0, v1, v2, v3, v4):
    """Per-element select of a per-precision constant by precision code (0..4)."""
    return tl.where(c == 0, v0, tl.where(c == 1, v1, tl.where(c == 2, v2, tl.where(c == 3, v3, v4))))


@triton.jit
def page_record_offsets(codes, rec_bytes, BS_PAD: tl.constexpr):
    """Byte offset of each token's record inside its part (keys or values), and the part size.

    codes, rec_bytes: [BS_PAD] int32 (padded positions: PAD_CODE, 0 bytes). Token j's record comes
    before token i's iff code_j < code_i, or code_j == code_i and j < i (format.py's record order),
    so offset_i = sum of rec_bytes_j over those j. -> ([BS_PAD] int32, scalar int32)
    """
    t = tl.arange(0, BS_PAD)
    ci, cj = codes[:, None], codes[None, :]
    before = (cj < ci) | ((cj == ci) & (t[None, :] < t[:, None]))  # [BS_PAD, BS_PAD]
    offsets = tl.sum(tl.where(before, rec_bytes[None, :], 0), axis=1)
    return offsets, tl.sum(rec_bytes, axis=0)


@triton.jit
def page_layout_of_head(
    header_ptr,  # uint8 bit map of the page (block_size bytes are read)
    head,
    HEADER_BYTES: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BS_PAD: tl.constexpr,
    REC_BYTES_0: tl.constexpr,
    REC_BYTES_1: tl.constexpr,
    REC_BYTES_2: tl.constexpr,
    REC_BYTES_3: tl.constexpr,
    REC_BYTES_4: tl.constexpr,
):
    """-> key codes, value codes [BS_PAD] int32, key and value record offsets from the page start
    [BS_PAD] int32, and the size of one head region (all regions have the same size)."""
    t = tl.arange(0, BS_PAD)
    raw = tl.load(header_ptr + t, mask=t < BLOCK_SIZE, other=0).to(tl.int32)
    key_codes = tl.where(t < BLOCK_SIZE, raw & 0xF, PAD_CODE)  # bit map: low nibble = key
    value_codes = tl.where(t < BLOCK_SIZE, raw >> 4, PAD_CODE)  # high nibble = value
    key_rb = by_code(key_codes, REC_BYTES_0, REC_BYTES_1, REC_BYTES_2, REC_BYTES_3, REC_BYTES_4)
    value_rb = by_code(value_codes, REC_BYTES_0, REC_BYTES_1, REC_BYTES_2, REC_BYTES_3, REC_BYTES_4)
    key_rb = tl.where(t < BLOCK_SIZE, key_rb, 0)
    value_rb = tl.where(t < BLOCK_SIZE, value_rb, 0)
    key_off, key_total = page_record_offsets(key_codes, key_rb, BS_PAD)
    value_off, value_total = page_record_offsets(value_codes, value_rb, BS_PAD)
    region = key_total + value_total
    start = HEADER_BYTES + head * region
    return key_codes, value_codes, start + key_off, start + key_total + value_off, region


@triton.jit
def _count_below(ratio, thresholds_ptr, NUM_LEVELS: tl.constexpr, BITS: tl.constexpr):
    """#{j : thresholds[j] < ratio} for sorted thresholds[0 .. NUM_LEVELS-2]: a branchless binary
    search, `BITS` probes. ratio: any shape fp32 -> int32 codes in [0, NUM_LEVELS)."""
    code = tl.zeros(ratio.shape, tl.int32)
    for step in tl.static_range(BITS):
        # probe code + half (half = NUM_LEVELS >> (step + 1)): at or above it iff threshold
        # [code + half - 1] < ratio. code is a multiple of 2 * half, so + is | (bit operations
        # need no overflow checks in the interpreter)
        below = tl.load(thresholds_ptr + (code | ((NUM_LEVELS >> (step + 1)) - 1))) < ratio
        code = tl.where(below, code | (NUM_LEVELS >> (step + 1)), code)
    return code


@triton.jit
def _write_quantized_records(
    y_ptr,  # fp32 rotated rows of this page and head: [BS_PAD tokens at stride_t, head_size]
    stride_t,
    page_ptr,  # uint8 page start
    tables_ptr,  # fp32 codebook_table
    offsets,  # [BS_PAD] int32 record offsets
    selected,  # [BS_PAD] bool: tokens stored at this precision
    BS_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    NG_PAD: tl.constexpr,
    BITS: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    ZERO_CODE: tl.constexpr,
    SCALES_OFF: tl.constexpr,
    LEVELS_AT: tl.constexpr,
    THRESH_AT: tl.constexpr,
    CLIPS_AT: tl.constexpr,
    NUM_CLIPS: tl.constexpr,
):
    """quant.reference.quantize + format.pack_codes for the selected tokens, written in place."""
    if tl.sum(selected.to(tl.int32), axis=0) > 0:  # most pages lack some precisions
        t = tl.arange(0, BS_PAD)
        g = tl.arange(0, NG_PAD)
        i = tl.arange(0, GROUP_SIZE)
        d = g[None, :, None] * GROUP_SIZE + i[None, None, :]  # [1, NG_PAD, G] element index
        rows = selected[:, None, None] & (g[None, :, None] < NUM_GROUPS)  # [BS_PAD, NG_PAD, 1]
        y = tl.load(y_ptr + t[:, None, None] * stride_t + d, mask=rows, other=0.0)  # [BS_PAD, NG_PAD, G]
        absmax = tl.max(tl.abs(y), axis=2)  # [BS_PAD, NG_PAD]
        top = tl.full(absmax.shape, tl.load(tables_ptr + LEVELS_AT + NUM_LEVELS - 1), tl.float32)
        best_codes = tl.full(y.shape, ZERO_CODE, tl.int32)
        best_scale = tl.zeros(absmax.shape, tl.float16)
        best_err = tl.full(absmax.shape, float("inf"), tl.float64)
        for j in range(NUM_CLIPS):  # in order: strict < keeps the earliest factor on ties
            scale = tl.math.div_rn(absmax * tl.load(tables_ptr + CLIPS_AT + j), top).to(tl.float16)
            s = scale.to(tl.float32)
            usable = s > 0  # scale 0: the group keeps scale 0 and ZERO_CODE unless a factor is usable
            ratio = tl.math.div_rn(y, tl.broadcast_to(tl.where(usable, s, 1.0)[:, :, None], y.shape))
            codes = _count_below(ratio, tables_ptr + THRESH_AT, NUM_LEVELS, BITS)
            decoded = tl.load(tables_ptr + LEVELS_AT + codes) * s[:, :, None]
            diff = y.to(tl.float64) - decoded.to(tl.float64)
            err = tl.where(usable, tl.sum(diff * diff, axis=2), float("inf"))
            better = err < best_err
            best_err = tl.where(better, err, best_err)
            best_scale = tl.where(better, scale, best_scale)
            best_codes = tl.where(better[:, :, None], codes, best_codes)

        params = selected[:, None] & (g[None, :] < NUM_GROUPS)  # [BS_PAD, NG_PAD]
        scale_idx = (offsets[:, None] + SCALES_OFF) // 2 + g[None, :]  # offsets are even (format)
        tl.store(page_ptr.to(tl.pointer_type(tl.float16)) + scale_idx, best_scale, mask=params)

        # the code stream: 8 codes of BITS bits are BITS bytes, element k of a chunk at bits
        # [k*BITS, (k+1)*BITS) of the chunk's little-endian word
        chunks: tl.constexpr = D_PAD // CODES_PER_CHUNK
        grouped = tl.reshape(best_codes, (BS_PAD, chunks, CODES_PER_CHUNK)).to(tl.uint64)
        k = tl.arange(0, CODES_PER_CHUNK)
        word = tl.sum(grouped << (k * BITS).to(tl.uint64)[None, None, :], axis=2)  # [BS_PAD, chunks]
        stream = (word[:, :, None] >> (k * 8).to(tl.uint64)[None, None, :]) & 0xFF  # byte k of a chunk
        c = tl.arange(0, chunks)
        dst = offsets[:, None, None] + c[None, :, None] * BITS + k[None, None, :]
        keep = (c[None, :, None] * CODES_PER_CHUNK < HEAD_SIZE) & (k[None, None, :] < BITS)
        tl.store(page_ptr + dst, stream.to(tl.uint8), mask=selected[:, None, None] & keep)


@triton.jit
def _write_part(
    raw_ptr,  # this page+head's 16-bit rows (int16 view), [tokens at stride_raw, head_size]
    stride_raw,
    y_ptr,  # the same rows rotated, fp32, [tokens at stride_y, head_size]
    stride_y,
    page_ptr,
    tables_ptr,
    codes,
    offsets,
    BS_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    NG_PAD: tl.constexpr,
    BITS_0: tl.constexpr,
    BITS_1: tl.constexpr,
    BITS_2: tl.constexpr,
    BITS_3: tl.constexpr,
    NUM_LEVELS_0: tl.constexpr,
    NUM_LEVELS_1: tl.constexpr,
    NUM_LEVELS_2: tl.constexpr,
    NUM_LEVELS_3: tl.constexpr,
    ZERO_CODE_0: tl.constexpr,
    ZERO_CODE_1: tl.constexpr,
    ZERO_CODE_2: tl.constexpr,
    ZERO_CODE_3: tl.constexpr,
    SCALES_OFF_0: tl.constexpr,
    SCALES_OFF_1: tl.constexpr,
    SCALES_OFF_2: tl.constexpr,
    SCALES_OFF_3: tl.constexpr,
    LEVELS_AT_0: tl.constexpr,
    LEVELS_AT_1: tl.constexpr,
    LEVELS_AT_2: tl.constexpr,
    LEVELS_AT_3: tl.constexpr,
    THRESH_AT_0: tl.constexpr,
    THRESH_AT_1: tl.constexpr,
    THRESH_AT_2: tl.constexpr,
    THRESH_AT_3: tl.constexpr,
    CLIPS_AT_0: tl.constexpr,
    CLIPS_AT_1: tl.constexpr,
    CLIPS_AT_2: tl.constexpr,
    CLIPS_AT_3: tl.constexpr,
    NUM_CLIPS_0: tl.constexpr,
    NUM_CLIPS_1: tl.constexpr,
    NUM_CLIPS_2: tl.constexpr,
    NUM_CLIPS_3: tl.constexpr,
):
    """All records of one part (the keys or the values) of one head region."""
    t = tl.arange(0, BS_PAD)
    d = tl.arange(0, D_PAD)
    verbatim = (codes == FP16_CODE)[:, None] & (d[None, :] < HEAD_SIZE)
    bits16 = tl.load(raw_ptr + t[:, None] * stride_raw + d[None, :], mask=verbatim, other=0)
    dst16 = page_ptr.to(tl.pointer_type(tl.int16)) + offsets[:, None] // 2 + d[None, :]
    tl.store(dst16, bits16, mask=verbatim)
    _write_quantized_records(
        y_ptr, stride_y, page_ptr, tables_ptr, offsets, codes == 0, BS_PAD, HEAD_SIZE, D_PAD, GROUP_SIZE,
        NUM_GROUPS, NG_PAD, BITS_0, NUM_LEVELS_0, ZERO_CODE_0, SCALES_OFF_0, LEVELS_AT_0, THRESH_AT_0,
        CLIPS_AT_0, NUM_CLIPS_0,
    )  # fmt: skip
    _write_quantized_records(
        y_ptr, stride_y, page_ptr, tables_ptr, offsets, codes == 1, BS_PAD, HEAD_SIZE, D_PAD, GROUP_SIZE,
        NUM_GROUPS, NG_PAD, BITS_1, NUM_LEVELS_1, ZERO_CODE_1, SCALES_OFF_1, LEVELS_AT_1, THRESH_AT_1,
        CLIPS_AT_1, NUM_CLIPS_1,
    )  # fmt: skip
    _write_quantized_records(
        y_ptr, stride_y, page_ptr, tables_ptr, offsets, codes == 2, BS_PAD, HEAD_SIZE, D_PAD, GROUP_SIZE,
        NUM_GROUPS, NG_PAD, BITS_2, NUM_LEVELS_2, ZERO_CODE_2, SCALES_OFF_2, LEVELS_AT_2, THRESH_AT_2,
        CLIPS_AT_2, NUM_CLIPS_2,
    )  # fmt: skip
    _write_quantized_records(
        y_ptr, stride_y, page_ptr, tables_ptr, offsets, codes == 3, BS_PAD, HEAD_SIZE, D_PAD, GROUP_SIZE,
        NUM_GROUPS, NG_PAD, BITS_3, NUM_LEVELS_3, ZERO_CODE_3, SCALES_OFF_3, LEVELS_AT_3, THRESH_AT_3,
        CLIPS_AT_3, NUM_CLIPS_3,
    )  # fmt: skip


@triton.jit
def _seal_kernel(
    header_ptr,  # [n, HEADER_BYTES] uint8 bit maps (padding included)
    key_raw_ptr,  # [n, block_size, H, D] int16 view of the 16-bit keys
    value_raw_ptr,  # [n, block_size, H, D] int16 view of the 16-bit values
    key_rot_ptr,  # [n, block_size, H, D] fp32 rotation.rotate of the clamped keys
    value_rot_ptr,  # [n, block_size, H, D] fp32 rotation.rotate of the clamped values
    stride_n,  # strides of the 16-bit tensors (elements)
    stride_t,
    stride_h,
    stride_rn,  # strides of the rotated tensors (elements)
    stride_rt,
    stride_rh,
    pages_ptr,  # [num_blocks, >= page_bytes] uint8 destination
    stride_page,
    dest_ptr,  # [n] int64: the page row each block is written to
    tables_ptr,  # fp32 codebook_table
    page_bytes,
    NUM_KV_HEADS: tl.constexpr,
    HEADER_BYTES: tl.constexpr,
    HEADER_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BS_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    NG_PAD: tl.constexpr,
    REC_BYTES_0: tl.constexpr,
    REC_BYTES_1: tl.constexpr,
    REC_BYTES_2: tl.constexpr,
    REC_BYTES_3: tl.constexpr,
    REC_BYTES_4: tl.constexpr,
    BITS_0: tl.constexpr,
    BITS_1: tl.constexpr,
    BITS_2: tl.constexpr,
    BITS_3: tl.constexpr,
    NUM_LEVELS_0: tl.constexpr,
    NUM_LEVELS_1: tl.constexpr,
    NUM_LEVELS_2: tl.constexpr,
    NUM_LEVELS_3: tl.constexpr,
    ZERO_CODE_0: tl.constexpr,
    ZERO_CODE_1: tl.constexpr,
    ZERO_CODE_2: tl.constexpr,
    ZERO_CODE_3: tl.constexpr,
    SCALES_OFF_0: tl.constexpr,
    SCALES_OFF_1: tl.constexpr,
    SCALES_OFF_2: tl.constexpr,
    SCALES_OFF_3: tl.constexpr,
    LEVELS_AT_0: tl.constexpr,
    LEVELS_AT_1: tl.constexpr,
    LEVELS_AT_2: tl.constexpr,
    LEVELS_AT_3: tl.constexpr,
    THRESH_AT_0: tl.constexpr,
    THRESH_AT_1: tl.constexpr,
    THRESH_AT_2: tl.constexpr,
    THRESH_AT_3: tl.constexpr,
    CLIPS_AT_0: tl.constexpr,
    CLIPS_AT_1: tl.constexpr,
    CLIPS_AT_2: tl.constexpr,
    CLIPS_AT_3: tl.constexpr,
    NUM_CLIPS_0: tl.constexpr,
    NUM_CLIPS_1: tl.constexpr,
    NUM_CLIPS_2: tl.constexpr,
    NUM_CLIPS_3: tl.constexpr,
    SLACK_CHUNK: tl.constexpr,
):
    n = tl.program_id(0)
    head = tl.program_id(1)
    header = header_ptr + n * HEADER_BYTES
    page = pages_ptr + tl.load(dest_ptr + n) * stride_page
    key_codes, value_codes, key_off, value_off, region = page_layout_of_head(
        header, head, HEADER_BYTES, BLOCK_SIZE, BS_PAD,
        REC_BYTES_0, REC_BYTES_1, REC_BYTES_2, REC_BYTES_3, REC_BYTES_4,
    )  # fmt: skip
    if head == 0:
        h = tl.arange(0, HEADER_PAD)
        tl.store(page + h, tl.load(header + h, mask=h < HEADER_BYTES), mask=h < HEADER_BYTES)
        c = tl.arange(0, SLACK_CHUNK)
        for start in range(HEADER_BYTES + NUM_KV_HEADS * region, page_bytes, SLACK_CHUNK):
            tl.store(page + start + c, tl.zeros([SLACK_CHUNK], tl.uint8), mask=start + c < page_bytes)
    raw = n * stride_n + head * stride_h
    rot = n * stride_rn + head * stride_rh
    _write_part(
        key_raw_ptr + raw, stride_t, key_rot_ptr + rot, stride_rt, page, tables_ptr, key_codes, key_off,
        BS_PAD, HEAD_SIZE, D_PAD, GROUP_SIZE, NUM_GROUPS, NG_PAD,
        BITS_0, BITS_1, BITS_2, BITS_3, NUM_LEVELS_0, NUM_LEVELS_1, NUM_LEVELS_2, NUM_LEVELS_3,
        ZERO_CODE_0, ZERO_CODE_1, ZERO_CODE_2, ZERO_CODE_3,
        SCALES_OFF_0, SCALES_OFF_1, SCALES_OFF_2, SCALES_OFF_3,
        LEVELS_AT_0, LEVELS_AT_1, LEVELS_AT_2, LEVELS_AT_3, THRESH_AT_0, THRESH_AT_1, THRESH_AT_2,
        THRESH_AT_3, CLIPS_AT_0, CLIPS_AT_1, CLIPS_AT_2, CLIPS_AT_3,
        NUM_CLIPS_0, NUM_CLIPS_1, NUM_CLIPS_2, NUM_CLIPS_3,
    )  # fmt: skip
    _write_part(
        value_raw_ptr + raw, stride_t, value_rot_ptr + rot, stride_rt, page, tables_ptr, value_codes,
        value_off,
        BS_PAD, HEAD_SIZE, D_PAD, GROUP_SIZE, NUM_GROUPS, NG_PAD,
        BITS_0, BITS_1, BITS_2, BITS_3, NUM_LEVELS_0, NUM_LEVELS_1, NUM_LEVELS_2, NUM_LEVELS_3,
        ZERO_CODE_0, ZERO_CODE_1, ZERO_CODE_2, ZERO_CODE_3,
        SCALES_OFF_0, SCALES_OFF_1, SCALES_OFF_2, SCALES_OFF_3,
        LEVELS_AT_0, LEVELS_AT_1, LEVELS_AT_2, LEVELS_AT_3, THRESH_AT_0, THRESH_AT_1, THRESH_AT_2,
        THRESH_AT_3, CLIPS_AT_0, CLIPS_AT_1, CLIPS_AT_2, CLIPS_AT_3,
        NUM_CLIPS_0, NUM_CLIPS_1, NUM_CLIPS_2, NUM_CLIPS_3,
    )  # fmt: skip


def seal_pages(
    codec: PageCodec,
    key: torch.Tensor,  # [n, block_size, num_kv_heads, head_size] fp16/bf16
    value: torch.Tensor,  # [n, block_size, num_kv_heads, head_size] fp16/bf16, same dtype
    key_bits: torch.Tensor,  # [n, block_size] bit-widths in {2, 3, 4, 8, 16}
    value_bits: torch.Tensor,  # [n, block_size]
    pages: torch.Tensor | None = None,  # [num_blocks, page_bytes] uint8 destination (any row stride)
    block_ids: torch.Tensor | None = None,  # [n] rows of `pages` to write
) -> torch.Tensor:
    """Seal n full blocks: the bytes of `codec.encode(key, value, key_bits, value_bits)`.

    Writes rows `block_ids` of `pages` in place when given (returns `pages`); otherwise returns a
    new [n, page_bytes] uint8 tensor. Tensors live on one device (CPU only under TRITON_INTERPRET=1).
    ValueError (before anything is written) for bits outside {2, 3, 4, 8, 16}, bits beyond the page
    budget, non-finite K/V, or a quantized record whose rotated values exceed the fp16 scale's range.
    """
    layout = codec.layout
    n, t, h, d = _check_seal_inputs(layout, key, value, key_bits, value_bits)
    device = key.device
    kb, vb = key_bits.to("cpu", torch.int64), value_bits.to("cpu", torch.int64)
    header = torch.zeros(n, layout.header_bytes, dtype=torch.uint8)
    if n:  # format.encode_bit_map validates the bits and owns the nibble packing
        header[:, :t] = fmt.encode_bit_map(kb.reshape(-1), vb.reshape(-1), n * t).reshape(n, t)
    rec_bytes = torch.zeros(Precision.FP16.bits + 1, dtype=torch.int64)  # record bytes by bit-width
    for p in PRECISIONS:
        rec_bytes[p.bits] = layout.record.record_bytes(p)
    used = layout.header_bytes + h * (rec_bytes[kb].sum(1) + rec_bytes[vb].sum(1))  # [n]
    if (used > layout.page_bytes).any():
        raise ValueError(f"bits exceed the page budget: need {int(used.max())} bytes, page holds "
                         f"{layout.page_bytes}")  # fmt: skip

    key, value = key.contiguous(), value.contiguous()
    check_finite(key, "key")
    check_finite(value, "value")
    # what reference.encode_records quantizes: the clamped rows, rotated by exact butterflies
    key_rot = rotate(key.float().clamp(-MAX_QUANTIZED_ABS, MAX_QUANTIZED_ABS)).contiguous()
    value_rot = rotate(value.float().clamp(-MAX_QUANTIZED_ABS, MAX_QUANTIZED_ABS)).contiguous()
    _check_quantizable(key_rot, (kb != Precision.FP16.bits).to(device), "key")
    _check_quantizable(value_rot, (vb != Precision.FP16.bits).to(device), "value")

    if pages is None:
        pages = torch.zeros(n, layout.page_bytes, dtype=torch.uint8, device=device)
        block_ids = torch.arange(n, device=device)
    elif block_ids is None or block_ids.shape != (n,):
        raise ValueError("pass block_ids [n] (the rows of `pages` to write) together with pages")
    if pages.dtype != torch.uint8 or pages.ndim != 2 or pages.shape[1] < layout.page_bytes:
        raise ValueError(f"pages must be uint8 [num_blocks, >= {layout.page_bytes}], got "
                         f"{pages.dtype} {list(pages.shape)}")  # fmt: skip
    if pages.stride(1) != 1 or pages.stride(0) % 2 or pages.data_ptr() % 2:
        raise ValueError("pages rows must be contiguous and 2-byte aligned (fp16 scale stores)")
    if n == 0:
        return pages
    _seal_kernel[(n, h)](
        header.to(device),
        key.view(torch.int16),
        value.view(torch.int16),
        key_rot,
        value_rot,
        key.stride(0),
        key.stride(1),
        key.stride(2),
        key_rot.stride(0),
        key_rot.stride(1),
        key_rot.stride(2),
        pages,
        pages.stride(0),
        block_ids.to(device=device, dtype=torch.int64),
        codebook_table(device),
        layout.page_bytes,
        NUM_KV_HEADS=h,
        SLACK_CHUNK=256,
        num_warps=SEAL_NUM_WARPS,
        enable_fp_fusion=False,  # the oracle rounds level * scale before subtracting it: no FMA
        **{k: v for k, v in layout_constexprs(layout).items() if k in _seal_kernel.arg_names},
    )
    return pages


def _check_seal_inputs(layout, key, value, key_bits, value_bits):
    """ValueError naming what is allowed; -> (n, block_size, num_kv_heads, head_size)."""
    want = (layout.block_size, layout.num_kv_heads, layout.record.head_size)
    if key.ndim != 4 or tuple(key.shape[1:]) != want or value.shape != key.shape:
        raise ValueError(
            f"key/value must be [n, {want[0]}, {want[1]}, {want[2]}] (full blocks of this layout), "
            f"got {list(key.shape)} / {list(value.shape)}"
        )
    if key.dtype not in fmt.STORAGE_DTYPES or value.dtype != key.dtype:
        raise ValueError(f"key/value dtype must be one of {fmt.STORAGE_DTYPES} (the same for both), "
                         f"got {key.dtype}/{value.dtype}")  # fmt: skip
    if key_bits.shape != key.shape[:2] or value_bits.shape != key.shape[:2]:
        raise ValueError(f"key_bits/value_bits must be [n, {want[0]}], got "
                         f"{list(key_bits.shape)} / {list(value_bits.shape)}")  # fmt: skip
    if value.device != key.device:
        raise ValueError("key and value must be on one device")
    return tuple(key.shape)


def _check_quantizable(y: torch.Tensor, quantized: torch.Tensor, name: str) -> None:
    """quant.reference's rule for quantized records: rotated values within +-MAX_ROTATED_ABS.

    y: [n, T, H, D] fp32 rotated; quantized: [n, T] bool (the token's record of this part is quantized).
    """
    if quantized.any() and y[quantized].abs().max() > MAX_ROTATED_ABS:
        raise ValueError(
            f"rotated {name} values beyond +-{MAX_ROTATED_ABS:g} cannot be stored in a quantized record "
            "(fp16 scale); store them at 16 bits"
        )
