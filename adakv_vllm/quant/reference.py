"""The fp32 oracle: quantize + pack and unpack + dequantize, records and whole pages.

Every fast path (CPU, Triton) is tested against these functions. They favour clarity over speed.

Quantizer (one quantized record: one token, one KV head, key or value):
    y = rotation.rotate(x)                              exact butterflies, fp32
    per group of `group_size` consecutive elements of y:
      a = max |y|
      for each f in levels.CLIP_FACTORS[bits]:          (best first on ties)
        s_f = fp16(a * f / top level)                   fp32 multiply and divide, then round to fp16
        code_i = #{t in THRESHOLDS[bits] : t < y_i / s_f}     (y_i / s_f in fp32)
        err_f = sum_i (y_i - LEVELS[code_i] * s_f)^2    in fp64, summed in element order
      keep the f with the least err_f; a group with a == 0 (or s_f == 0) stores scale 0 and the
      zero_code for every element
    decode: y^_i = LEVELS[code_i] * s (fp32); x^ = rotation.unrotate(y^)

Inputs are clamped to +-MAX_QUANTIZED_ABS first (what a sealed page stores for such values), and a
quantized record refuses a rotated value beyond +-MAX_ROTATED_ABS (its scale would overflow fp16):
the store sanitises such rows before sealing (blocks/store.py). 16-bit records are the model's
bytes, verbatim.
"""

from __future__ import annotations

import torch

from adakv_vllm.quant import format as fmt
from adakv_vllm.quant import levels
from adakv_vllm.quant.precision import Precision
from adakv_vllm.quant.rotation import rotate, unrotate

MAX_QUANTIZED_ABS = 32768.0
# the largest rotated value a quantized record takes: its scale a * 1.0 / top level stays < fp16 max
MAX_ROTATED_ABS = 65504.0


def check_finite(x: torch.Tensor, name: str = "input") -> None:
    if not torch.is_floating_point(x):
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf; AdaKV cannot cache non-finite values")


def _check_quantizable(y: torch.Tensor) -> None:
    check_finite(y)
    if y.numel() and y.abs().max() > MAX_ROTATED_ABS:
        raise ValueError(
            f"rotated values beyond +-{MAX_ROTATED_ABS:g} cannot be stored in a quantized record "
            "(fp16 scale); store them at 16 bits"
        )


def quantize(y: torch.Tensor, p: Precision, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y: [n, head_size] fp32, already rotated -> (codes [n, head_size] uint8, scales [n, G] fp16)."""
    assert p.is_quantized
    _check_quantizable(y)
    n, d = y.shape
    g = y.to(torch.float32).reshape(n, d // group_size, group_size)
    table, thresholds = levels.LEVELS[p.bits], levels.THRESHOLDS[p.bits]
    top = table[-1]
    absmax = g.abs().amax(-1)  # [n, G]
    best_codes = torch.full_like(g, levels.zero_code(p.bits), dtype=torch.int64)
    best_scale = torch.zeros(n, d // group_size, dtype=torch.float16)
    best_err = torch.full((n, d // group_size), float("inf"), dtype=torch.float64)
    for f in levels.CLIP_FACTORS[p.bits]:
        scale = ((absmax * f) / top).to(torch.float16)  # [n, G]
        s = scale.float().unsqueeze(-1)
        usable = s > 0
        ratio = torch.where(usable, g / torch.where(usable, s, torch.ones_like(s)), torch.zeros_like(g))
        codes = torch.bucketize(ratio, thresholds, right=False)  # #thresholds strictly below
        codes = torch.where(usable, codes, torch.full_like(codes, levels.zero_code(p.bits)))
        decoded = table[codes] * s
        err = (g.double() - decoded.double()).square().cumsum(-1)[..., -1]  # element order
        err = torch.where(usable.squeeze(-1), err, torch.full_like(err, float("inf")))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_codes = torch.where(better.unsqueeze(-1), codes, best_codes)
    return best_codes.to(torch.uint8).reshape(n, d), best_scale


def dequantize(codes: torch.Tensor, scales: torch.Tensor, p: Precision, group_size: int) -> torch.Tensor:
    """Inverse of quantize, in the rotated space: -> fp32 [n, head_size]."""
    n, d = codes.shape
    values = levels.LEVELS[p.bits][codes.to(torch.int64)].reshape(n, d // group_size, group_size)
    return (values * scales.float().unsqueeze(-1)).reshape(n, d)


def stored_kv(x: torch.Tensor, p: Precision, group_size: int) -> torch.Tensor:
    """What a sealed page gives back for K or V vectors: x: [..., head_size] -> fp32."""
    if not p.is_quantized:
        return x.to(torch.float32)
    flat = x.reshape(-1, x.shape[-1]).float().clamp(-MAX_QUANTIZED_ABS, MAX_QUANTIZED_ABS)
    codes, scales = quantize(rotate(flat), p, group_size)
    return unrotate(dequantize(codes, scales, p, group_size)).reshape(x.shape)


def relative_errors(x: torch.Tensor, precisions, group_size: int) -> torch.Tensor:
    """x: [T, H, D] -> [T, P]: for each precision, the mean over heads of ||x - stored(x)|| / ||x||,
    the token's own quantization error (the "quality score" feature; rotation preserves the norm
    up to a power of two, so the error is measured in the rotated space)."""
    t, h, d = x.shape
    y = rotate(x.reshape(t * h, d).float().clamp(-MAX_QUANTIZED_ABS, MAX_QUANTIZED_ABS))
    norm = y.norm(dim=-1).clamp_min(1e-6)
    out = []
    for p in precisions:
        codes, scales = quantize(y, p, group_size)
        err = (dequantize(codes, scales, p, group_size) - y).norm(dim=-1)
        out.append((err / norm).view(t, h).mean(-1))
    return torch.stack(out, -1)


def encode_records(x: torch.Tensor, p: Precision, layout: fmt.RecordLayout) -> torch.Tensor:
    """x: [n, head_size] (fp16/bf16; fp32 allowed for quantized) -> [n, record_bytes] uint8."""
    if x.ndim != 2 or x.shape[1] != layout.head_size:
        raise ValueError(f"expected [n, {layout.head_size}], got {list(x.shape)}")
    if not p.is_quantized:
        if x.dtype not in fmt.STORAGE_DTYPES:
            raise ValueError(f"16-bit records store {fmt.STORAGE_DTYPES} verbatim, got {x.dtype}")
        check_finite(x)
        return x.contiguous().view(torch.uint8).reshape(x.shape[0], -1)
    check_finite(x)
    y = rotate(x.float().clamp(-MAX_QUANTIZED_ABS, MAX_QUANTIZED_ABS))
    codes, scales = quantize(y, p, layout.group_size)
    return fmt.join_record(fmt.pack_codes(codes, p), scales)


def decode_records(
    records: torch.Tensor, p: Precision, layout: fmt.RecordLayout, storage_dtype: torch.dtype
) -> torch.Tensor:
    """records: [n, record_bytes] uint8 -> fp32 [n, head_size] (rotated back)."""
    if not p.is_quantized:
        return records.contiguous().view(storage_dtype).reshape(records.shape[0], -1).float()
    packed, scales = fmt.split_record(records, layout, p)
    return unrotate(dequantize(fmt.unpack_codes(packed, p), scales, p, layout.group_size))


def pack_page(
    layout: fmt.PageLayout,
    key: torch.Tensor,
    value: torch.Tensor,
    key_bits: torch.Tensor,
    value_bits: torch.Tensor,
) -> torch.Tensor:
    """Seal one page.

    key, value: [num_tokens, num_kv_heads, head_size] fp16/bf16 (num_tokens <= block_size)
    key_bits, value_bits: [num_tokens] bit-widths
    returns: [page_bytes] uint8
    """
    n, h, d = key.shape
    if value.shape != key.shape or h != layout.num_kv_heads or d != layout.record.head_size:
        raise ValueError(
            f"key/value shape {list(key.shape)}/{list(value.shape)} does not match the page layout"
        )
    if n > layout.block_size or key_bits.shape != (n,) or value_bits.shape != (n,):
        raise ValueError("need one key and one value bit-width per token, at most block_size tokens")
    if not layout.fits(key_bits, value_bits):
        raise ValueError(
            f"bits need {layout.used_bytes(key_bits, value_bits)} bytes, page holds {layout.page_bytes}"
        )
    page = torch.zeros(layout.page_bytes, dtype=torch.uint8)
    page[: layout.header_bytes] = fmt.encode_bit_map(key_bits, value_bits, layout.header_bytes)
    region = layout.region_bytes(key_bits, value_bits)
    for head in range(h):
        start = layout.head_region_offset(head, region)
        for x, bits in ((key[:, head], key_bits), (value[:, head], value_bits)):
            order = layout.record_order(bits)
            for p, first, count, offset in layout.class_spans(bits, start):
                rec = encode_records(x[order[first : first + count]], p, layout.record)
                page[offset : offset + rec.numel()] = rec.reshape(-1)
                start = offset + rec.numel()
    return page


def unpack_page(layout: fmt.PageLayout, page: torch.Tensor, num_tokens: int, storage_dtype: torch.dtype):
    """Inverse of pack_page: -> (key fp32 [n, H, D], value fp32 [n, H, D], key_bits [n], value_bits [n])."""
    key_bits, value_bits = fmt.decode_bit_map(page[: layout.header_bytes], num_tokens)
    h, d = layout.num_kv_heads, layout.record.head_size
    out = [torch.empty(num_tokens, h, d), torch.empty(num_tokens, h, d)]
    region = layout.region_bytes(key_bits, value_bits)
    for head in range(h):
        start = layout.head_region_offset(head, region)
        for x, bits in ((out[0], key_bits), (out[1], value_bits)):
            order = layout.record_order(bits)
            for p, first, count, offset in layout.class_spans(bits, start):
                size = layout.record.record_bytes(p)
                rec = page[offset : offset + count * size].reshape(count, size)
                x[order[first : first + count], head] = decode_records(rec, p, layout.record, storage_dtype)
                start = offset + count * size
    return out[0], out[1], key_bits, value_bits
