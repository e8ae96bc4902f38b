"""Triton page sealing: quantize + pack a batch of full blocks into their pages, on the GPU.

Produces the same bytes as `PageCodec.encode` (and so as the oracle `quant.reference.pack_page`):
asymmetric round-to-nearest per group, fp16 scale/min rounded outward, codes packed little-endian,
16-bit records copied verbatim, bit map in the header, zeros everywhere else. Layout numbers come
from `quant.format` through `layout_constexprs`; the kernels only implement the documented rules
(records ordered by precision code then token position; element j of a byte at bits [j*bits, ...)).

Grid: one program per (page, KV head). Each program reads the page's bit map, derives every record
offset of its head region (`page_record_offsets`, shared with the decode kernel), then writes the
key records and the value records of that head; the program of head 0 also writes the header and
zeroes the slack after the last region.

Bit-exactness: every fp32 step of the oracle is one IEEE-rounded operation (division with
`div_rn`, rounding half to even, no fused multiply-add: launched with `enable_fp_fusion=False`).
With rotate_keys the rotation is a torch matmul done before the launch (as `rotation.rotate`), so
pages equal the codec's when torch's matmul gives each row the same bits as the codec's call does:
true on CPU (the tests); a GPU matmul may differ from the CPU one in the last bit, which can move a
rotated key's code or fp16 scale by one step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adakv_vllm.kernels.page_codec import PageCodec
from adakv_vllm.quant import format as fmt
from adakv_vllm.quant.precision import PRECISIONS, Precision
from adakv_vllm.quant.reference import MAX_QUANTIZED_ABS, check_finite
from adakv_vllm.quant.rotation import rotation_matrix

# A padded token position (block_size not a power of two) gets this code: it sorts after every
# real record and is given zero record bytes, so it never moves an offset.
PAD_CODE = tl.constexpr(15)
# The 16-bit record's code; the quantized precisions have codes 0..FP16_CODE-1 (kernels rely on it).
FP16_CODE = tl.constexpr(Precision.FP16.code)
_QUANTIZED = tuple(p for p in PRECISIONS if p.is_quantized)
assert [p.code for p in _QUANTIZED] == list(range(FP16_CODE.value)) and FP16_CODE.value == len(_QUANTIZED)


def layout_constexprs(layout: fmt.PageLayout) -> dict[str, int]:
    """Every layout number the kernels need, from format.py (each kernel takes the ones it names).

    Suffix _0/_1/_2 = the quantized precision codes (2/4/8 bits), _3 = the 16-bit record.
    """
    rec = layout.record
    assert fmt.PARAM_BYTES == 2  # scale and min are read and written through fp16 pointers
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
        "REC_BYTES_3": rec.record_bytes(Precision.FP16),
    }
    for p in _QUANTIZED:
        c = p.code
        out[f"REC_BYTES_{c}"] = rec.record_bytes(p)
        out[f"BITS_{c}"] = p.bits
        out[f"PER_BYTE_{c}"] = fmt.elements_per_byte(p)
        out[f"CODE_MASK_{c}"] = fmt.code_mask(p)
        out[f"CODES_BYTES_{c}"] = rec.codes_bytes(p)
        out[f"SCALES_OFF_{c}"] = rec.scales_offset(p)
        out[f"MINS_OFF_{c}"] = rec.mins_offset(p)
    return out


@triton.jit
def by_code(c, v0, v1, v2, v3):
    """Per-element select of a per-precision constant by precision code (0..3)."""
    return tl.where(c == 0, v0, tl.where(c == 1, v1, tl.where(c == 2, v2, v3)))


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
):
    """-> key codes, value codes [BS_PAD] int32, key and value record offsets from the page start
    [BS_PAD] int32, and the end of all head regions (where the slack begins)."""
    t = tl.arange(0, BS_PAD)
    raw = tl.load(header_ptr + t, mask=t < BLOCK_SIZE, other=0).to(tl.int32)
    key_codes = tl.where(t < BLOCK_SIZE, raw & 0xF, PAD_CODE)  # bit map: low nibble = key
    value_codes = tl.where(t < BLOCK_SIZE, raw >> 4, PAD_CODE)  # high nibble = value
    key_rb = by_code(key_codes, REC_BYTES_0, REC_BYTES_1, REC_BYTES_2, REC_BYTES_3)
    value_rb = by_code(value_codes, REC_BYTES_0, REC_BYTES_1, REC_BYTES_2, REC_BYTES_3)
    key_rb = tl.where(t < BLOCK_SIZE, key_rb, 0)
    value_rb = tl.where(t < BLOCK_SIZE, value_rb, 0)
    key_off, key_total = page_record_offsets(key_codes, key_rb, BS_PAD)
    value_off, value_total = page_record_offsets(value_codes, value_rb, BS_PAD)
    region = key_total + value_total
    start = HEADER_BYTES + head * region  # head regions all have the same size
    return key_codes, value_codes, start + key_off, start + key_total + value_off, region


@triton.jit
def _fp16_next(h, UP: tl.constexpr):
    """nextafter(h, +inf) if UP else nextafter(h, -inf), for finite fp16 h."""
    bits = h.to(tl.int16, bitcast=True).to(tl.int32)
    if UP:
        nxt = tl.where(h == 0, 1, tl.where(h > 0, bits + 1, bits - 1))
    else:
        nxt = tl.where(h == 0, -32767, tl.where(h > 0, bits - 1, bits + 1))  # -32767 = 0x8001
    return nxt.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _round_half_even(y):
    """torch.round for y >= 0 without the floor(y + 0.5) double-rounding trap."""
    r = tl.floor(y)
    frac = y - r  # exact for 0 <= y < 2**23
    odd = (r.to(tl.int32) & 1) == 1
    return r + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)


@triton.jit
def _write_quantized_records(
    src_ptr,  # [BS_PAD tokens at stride_t, head_size] source rows of this page and head
    stride_t,
    page_ptr,  # uint8 page start
    offsets,  # [BS_PAD] int32 record offsets
    selected,  # [BS_PAD] bool: tokens stored at this precision
    BS_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    NG_PAD: tl.constexpr,
    BITS: tl.constexpr,
    PER_BYTE: tl.constexpr,
    CODE_MASK: tl.constexpr,
    CODES_BYTES: tl.constexpr,
    SCALES_OFF: tl.constexpr,
    MINS_OFF: tl.constexpr,
):
    """quant.reference.quantize + format.pack_codes for the selected tokens, written in place."""
    t = tl.arange(0, BS_PAD)
    g = tl.arange(0, NG_PAD)
    i = tl.arange(0, GROUP_SIZE)
    d = g[None, :, None] * GROUP_SIZE + i[None, None, :]  # [1, NG_PAD, G] element index
    rows = selected[:, None, None] & (g[None, :, None] < NUM_GROUPS)  # [BS_PAD, NG_PAD, 1]
    x = tl.load(src_ptr + t[:, None, None] * stride_t + d, mask=rows, other=0.0).to(tl.float32)
    top = CODE_MASK * 1.0  # 2**bits - 1 levels above the min
    lo = tl.min(x, axis=2)  # [BS_PAD, NG_PAD]
    hi = tl.max(x, axis=2)
    mins = lo.to(tl.float16)
    mins = tl.where(mins.to(tl.float32) > lo, _fp16_next(mins, False), mins)
    want = tl.math.div_rn(hi - mins.to(tl.float32), tl.full(hi.shape, top, tl.float32))
    scales = want.to(tl.float16)
    scales = tl.where(scales.to(tl.float32) < want, _fp16_next(scales, True), scales)
    # fp32 rounding of mins + scales*top can still land one ulp short of max: widen once more.
    short = mins.to(tl.float32) + scales.to(tl.float32) * top < hi
    scales = tl.where(short, _fp16_next(scales, True), scales)
    s = scales.to(tl.float32)[:, :, None]
    safe = tl.broadcast_to(tl.where(s > 0, s, 1.0), x.shape)
    y = tl.math.div_rn(x - mins.to(tl.float32)[:, :, None], safe)
    codes = tl.where(s > 0, _round_half_even(y), 0.0)
    codes = tl.minimum(tl.maximum(codes, 0.0), top).to(tl.int32)  # [BS_PAD, NG_PAD, G]

    params = selected[:, None] & (g[None, :] < NUM_GROUPS)  # [BS_PAD, NG_PAD]
    params_ptr = page_ptr.to(tl.pointer_type(tl.float16))
    scale_idx = (offsets[:, None] + SCALES_OFF) // 2 + g[None, :]  # offsets are even (format)
    min_idx = (offsets[:, None] + MINS_OFF) // 2 + g[None, :]
    tl.store(params_ptr + scale_idx, scales, mask=params)
    tl.store(params_ptr + min_idx, mins, mask=params)

    nbytes: tl.constexpr = NG_PAD * GROUP_SIZE // PER_BYTE
    grouped = tl.reshape(codes, (BS_PAD, nbytes, PER_BYTE))
    shifts = tl.arange(0, PER_BYTE) * BITS  # element j of a byte at bits [j*bits, (j+1)*bits)
    packed = tl.sum(grouped << shifts[None, None, :], axis=2)  # [BS_PAD, nbytes]
    b = tl.arange(0, nbytes)
    tl.store(
        page_ptr + offsets[:, None] + b[None, :],
        packed.to(tl.uint8),
        mask=selected[:, None] & (b[None, :] < CODES_BYTES),
    )


@triton.jit
def _write_part(
    raw_ptr,  # this page+head's 16-bit rows (int16 view), [tokens at stride_raw, head_size]
    stride_raw,
    quant_ptr,  # rows to quantize (the raw rows, or fp32 rotated keys), [tokens at stride_q, head_size]
    stride_q,
    page_ptr,
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
    PER_BYTE_0: tl.constexpr,
    PER_BYTE_1: tl.constexpr,
    PER_BYTE_2: tl.constexpr,
    CODE_MASK_0: tl.constexpr,
    CODE_MASK_1: tl.constexpr,
    CODE_MASK_2: tl.constexpr,
    CODES_BYTES_0: tl.constexpr,
    CODES_BYTES_1: tl.constexpr,
    CODES_BYTES_2: tl.constexpr,
    SCALES_OFF_0: tl.constexpr,
    SCALES_OFF_1: tl.constexpr,
    SCALES_OFF_2: tl.constexpr,
    MINS_OFF_0: tl.constexpr,
    MINS_OFF_1: tl.constexpr,
    MINS_OFF_2: tl.constexpr,
):
    """All records of one part (the keys or the values) of one head region."""
    t = tl.arange(0, BS_PAD)
    d = tl.arange(0, D_PAD)
    verbatim = (codes == FP16_CODE)[:, None] & (d[None, :] < HEAD_SIZE)
    bits16 = tl.load(raw_ptr + t[:, None] * stride_raw + d[None, :], mask=verbatim, other=0)
    dst16 = page_ptr.to(tl.pointer_type(tl.int16)) + offsets[:, None] // 2 + d[None, :]
    tl.store(dst16, bits16, mask=verbatim)
    _write_quantized_records(
        quant_ptr, stride_q, page_ptr, offsets, codes == 0, BS_PAD, HEAD_SIZE, GROUP_SIZE, NUM_GROUPS,
        NG_PAD, BITS_0, PER_BYTE_0, CODE_MASK_0, CODES_BYTES_0, SCALES_OFF_0, MINS_OFF_0,
    )  # fmt: skip
    _write_quantized_records(
        quant_ptr, stride_q, page_ptr, offsets, codes == 1, BS_PAD, HEAD_SIZE, GROUP_SIZE, NUM_GROUPS,
        NG_PAD, BITS_1, PER_BYTE_1, CODE_MASK_1, CODES_BYTES_1, SCALES_OFF_1, MINS_OFF_1,
    )  # fmt: skip
    _write_quantized_records(
        quant_ptr, stride_q, page_ptr, offsets, codes == 2, BS_PAD, HEAD_SIZE, GROUP_SIZE, NUM_GROUPS,
        NG_PAD, BITS_2, PER_BYTE_2, CODE_MASK_2, CODES_BYTES_2, SCALES_OFF_2, MINS_OFF_2,
    )  # fmt: skip


@triton.jit
def _seal_kernel(
    header_ptr,  # [n, HEADER_BYTES] uint8 bit maps (padding included)
    key_raw_ptr,  # [n, block_size, H, D] int16 view of the 16-bit keys
    value_raw_ptr,  # [n, block_size, H, D] int16 view of the 16-bit values
    key_q_ptr,  # [n, block_size, H, D] keys to quantize (16-bit keys, or fp32 rotated keys)
    value_q_ptr,  # [n, block_size, H, D] values to quantize (= the 16-bit values)
    stride_n,
    stride_t,
    stride_h,
    stride_qn,
    stride_qt,
    stride_qh,
    pages_ptr,  # [num_blocks, >= page_bytes] uint8 destination
    stride_page,
    dest_ptr,  # [n] int64: the page row each block is written to
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
    BITS_0: tl.constexpr,
    BITS_1: tl.constexpr,
    BITS_2: tl.constexpr,
    PER_BYTE_0: tl.constexpr,
    PER_BYTE_1: tl.constexpr,
    PER_BYTE_2: tl.constexpr,
    CODE_MASK_0: tl.constexpr,
    CODE_MASK_1: tl.constexpr,
    CODE_MASK_2: tl.constexpr,
    CODES_BYTES_0: tl.constexpr,
    CODES_BYTES_1: tl.constexpr,
    CODES_BYTES_2: tl.constexpr,
    SCALES_OFF_0: tl.constexpr,
    SCALES_OFF_1: tl.constexpr,
    SCALES_OFF_2: tl.constexpr,
    MINS_OFF_0: tl.constexpr,
    MINS_OFF_1: tl.constexpr,
    MINS_OFF_2: tl.constexpr,
    SLACK_CHUNK: tl.constexpr,
):
    n = tl.program_id(0)
    head = tl.program_id(1)
    header = header_ptr + n * HEADER_BYTES
    page = pages_ptr + tl.load(dest_ptr + n) * stride_page
    key_codes, value_codes, key_off, value_off, region = page_layout_of_head(
        header, head, HEADER_BYTES, BLOCK_SIZE, BS_PAD, REC_BYTES_0, REC_BYTES_1, REC_BYTES_2, REC_BYTES_3
    )
    if head == 0:
        h = tl.arange(0, HEADER_PAD)
        tl.store(page + h, tl.load(header + h, mask=h < HEADER_BYTES), mask=h < HEADER_BYTES)
        c = tl.arange(0, SLACK_CHUNK)
        for start in range(HEADER_BYTES + NUM_KV_HEADS * region, page_bytes, SLACK_CHUNK):
            tl.store(page + start + c, tl.zeros([SLACK_CHUNK], tl.uint8), mask=start + c < page_bytes)
    raw = n * stride_n + head * stride_h
    quant = n * stride_qn + head * stride_qh
    _write_part(
        key_raw_ptr + raw, stride_t, key_q_ptr + quant, stride_qt, page, key_codes, key_off, BS_PAD,
        HEAD_SIZE, D_PAD, GROUP_SIZE, NUM_GROUPS, NG_PAD, BITS_0, BITS_1, BITS_2, PER_BYTE_0, PER_BYTE_1,
        PER_BYTE_2, CODE_MASK_0, CODE_MASK_1, CODE_MASK_2, CODES_BYTES_0, CODES_BYTES_1, CODES_BYTES_2,
        SCALES_OFF_0, SCALES_OFF_1, SCALES_OFF_2, MINS_OFF_0, MINS_OFF_1, MINS_OFF_2,
    )  # fmt: skip
    _write_part(
        value_raw_ptr + raw, stride_t, value_q_ptr + raw, stride_t, page, value_codes, value_off, BS_PAD,
        HEAD_SIZE, D_PAD, GROUP_SIZE, NUM_GROUPS, NG_PAD, BITS_0, BITS_1, BITS_2, PER_BYTE_0, PER_BYTE_1,
        PER_BYTE_2, CODE_MASK_0, CODE_MASK_1, CODE_MASK_2, CODES_BYTES_0, CODES_BYTES_1, CODES_BYTES_2,
        SCALES_OFF_0, SCALES_OFF_1, SCALES_OFF_2, MINS_OFF_0, MINS_OFF_1, MINS_OFF_2,
    )  # fmt: skip


def seal_pages(
    codec: PageCodec,
    key: torch.Tensor,  # [n, block_size, num_kv_heads, head_size] fp16/bf16
    value: torch.Tensor,  # [n, block_size, num_kv_heads, head_size] fp16/bf16, same dtype
    key_bits: torch.Tensor,  # [n, block_size] bit-widths in {2, 4, 8, 16}
    value_bits: torch.Tensor,  # [n, block_size]
    pages: torch.Tensor | None = None,  # [num_blocks, page_bytes] uint8 destination (any row stride)
    block_ids: torch.Tensor | None = None,  # [n] rows of `pages` to write
) -> torch.Tensor:
    """Seal n full blocks: the bytes of `codec.encode(key, value, key_bits, value_bits)`.

    Writes rows `block_ids` of `pages` in place when given (returns `pages`); otherwise returns a
    new [n, page_bytes] uint8 tensor. Tensors live on one device (CPU only under TRITON_INTERPRET=1).
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
    # rotation.rotate's matmul, with the matrix on key's device
    key_q = (key.to(torch.float32) @ rotation_matrix(d).to(device)).contiguous() if codec.rotate_keys else key
    _check_quantizable(key_q, (kb != Precision.FP16.bits).to(device), "key")
    _check_quantizable(value, (vb != Precision.FP16.bits).to(device), "value")

    if pages is None:
        pages = torch.zeros(n, layout.page_bytes, dtype=torch.uint8, device=device)
        block_ids = torch.arange(n, device=device)
    elif block_ids is None or block_ids.shape != (n,):
        raise ValueError("pass block_ids [n] (the rows of `pages` to write) together with pages")
    if pages.dtype != torch.uint8 or pages.ndim != 2 or pages.shape[1] < layout.page_bytes:
        raise ValueError(f"pages must be uint8 [num_blocks, >= {layout.page_bytes}], got "
                         f"{pages.dtype} {list(pages.shape)}")  # fmt: skip
    if pages.stride(1) != 1 or pages.stride(0) % 2 or pages.data_ptr() % 2:
        raise ValueError("pages rows must be contiguous and 2-byte aligned (fp16 scale/min stores)")
    if n == 0:
        return pages
    _seal_kernel[(n, h)](
        header.to(device),
        key.view(torch.int16),
        value.view(torch.int16),
        key_q,
        value,
        key.stride(0),
        key.stride(1),
        key.stride(2),
        key_q.stride(0),
        key_q.stride(1),
        key_q.stride(2),
        pages,
        pages.stride(0),
        block_ids.to(device=device, dtype=torch.int64),
        layout.page_bytes,
        NUM_KV_HEADS=h,
        SLACK_CHUNK=256,
        enable_fp_fusion=False,  # the oracle rounds mins + scales*top twice: no FMA
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


def _check_quantizable(x: torch.Tensor, quantized: torch.Tensor, name: str) -> None:
    """quant.reference's rule for quantized records: |x| <= MAX_QUANTIZED_ABS.

    x: [n, T, H, D] finite; quantized: [n, T] bool (the token's record of this part is quantized).
    """
    if quantized.any() and x[quantized].abs().max() > MAX_QUANTIZED_ABS:
        raise ValueError(
            f"{name} values beyond +-{MAX_QUANTIZED_ABS:g} cannot be stored in a quantized record "
            "(fp16 scale/min); store them at 16 bits"
        )
