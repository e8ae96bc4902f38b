"""The fp32 oracle: quantize + pack and unpack + dequantize, records and whole pages.

Every fast path (CPU, Triton) is tested against these functions. They favour clarity over speed.

Quantizer: asymmetric round-to-nearest per group of `group_size` consecutive elements,
    scale = (max - min) / (2**bits - 1),   code = round((x - min) / scale),   x^ = code*scale + min.
Scale and min are stored as fp16 and rounded *outward* (min down, scale up) so that every element
lies inside [min, min + scale*(2**bits - 1)] after rounding; hence the documented bound

    |x - x^| <= scale/2 + 2**-20 * max|x|        (per group; the second term is fp32 arithmetic)

holds with the stored fp16 scale, and constant groups reconstruct exactly when their value is an
fp16 number. Quantized records accept |x| <= MAX_QUANTIZED_ABS (fp16 range with headroom); larger
values must be stored at 16 bits.
"""

from __future__ import annotations

import torch

from adakv_vllm.quant import format as fmt
from adakv_vllm.quant.precision import Precision
from adakv_vllm.quant.rotation import rotate

MAX_QUANTIZED_ABS = 32768.0
ERROR_ABS_SLACK = 2.0**-20


def check_finite(x: torch.Tensor, name: str = "input") -> None:
    if not torch.is_floating_point(x):
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf; AdaKV cannot cache non-finite values")


def _check_quantizable(x: torch.Tensor) -> None:
    check_finite(x)
    if x.numel() and x.abs().max() > MAX_QUANTIZED_ABS:
        raise ValueError(
            f"values beyond +-{MAX_QUANTIZED_ABS:g} cannot be stored in a quantized record "
            "(fp16 scale/min); store them at 16 bits"
        )


def _outward_fp16(v: torch.Tensor, direction: float) -> torch.Tensor:
    """Round fp32 `v` to fp16 so that the result is <= v (direction -inf) or >= v (+inf)."""
    h = v.to(torch.float16)
    wrong = h.float() < v if direction > 0 else h.float() > v
    return torch.where(wrong, torch.nextafter(h, torch.full_like(h, direction)), h)


def quantize(x: torch.Tensor, p: Precision, group_size: int):
    """x: [n, head_size] float -> (codes [n, head_size] uint8, scales [n, G] fp16, mins [n, G] fp16)."""
    assert p.is_quantized
    _check_quantizable(x)
    n, d = x.shape
    g = x.to(torch.float32).reshape(n, d // group_size, group_size)
    top = p.levels - 1
    mins = _outward_fp16(g.amin(-1), -torch.inf)
    scales = _outward_fp16((g.amax(-1) - mins.float()) / top, torch.inf)
    # fp32 rounding of mins + scales*top can still land one ulp short of max: widen once more.
    short = mins.float() + scales.float() * top < g.amax(-1)
    scales = torch.where(short, torch.nextafter(scales, torch.full_like(scales, torch.inf)), scales)
    s = scales.float().unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.where(s > 0, torch.round((g - mins.float().unsqueeze(-1)) / safe), torch.zeros_like(g))
    return codes.clamp(0, top).to(torch.uint8).reshape(n, d), scales, mins


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Inverse of quantize: -> fp32 [n, head_size]."""
    n, d = codes.shape
    g = codes.to(torch.float32).reshape(n, d // group_size, group_size)
    return (g * scales.float().unsqueeze(-1) + mins.float().unsqueeze(-1)).reshape(n, d)


def error_bound(scales: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """The per-element bound of the module docstring. scales: [n, G] fp16, x: [n, head_size]."""
    n, d = x.shape
    half = (scales.float() / 2).repeat_interleave(group_size, dim=1)
    return half + ERROR_ABS_SLACK * x.float().abs().amax()


def fake_quantize(x: torch.Tensor, p: Precision, group_size: int) -> torch.Tensor:
    """Quantize then dequantize along the last dim. x: [..., head_size] -> fp32, same shape."""
    if not p.is_quantized:
        check_finite(x)
        return x.to(torch.float32)
    flat = x.reshape(-1, x.shape[-1])
    codes, scales, mins = quantize(flat, p, group_size)
    return dequantize(codes, scales, mins, group_size).reshape(x.shape)


def stored_kv(x: torch.Tensor, p: Precision, group_size: int, rotate_record: bool) -> torch.Tensor:
    """What a sealed page gives back for K or V vectors: x: [..., head_size] -> fp32.

    The store clamps to the quantizable range, quantizes (Hadamard-rotated when `rotate_record`, i.e.
    keys with rotate_keys) and rotates back on decode; 16-bit records are exact.
    """
    if not p.is_quantized:
        return x.to(torch.float32)
    y = x.float().clamp(-MAX_QUANTIZED_ABS, MAX_QUANTIZED_ABS)
    if rotate_record:
        return rotate(fake_quantize(rotate(y), p, group_size))
    return fake_quantize(y, p, group_size)


def relative_error(x: torch.Tensor, p: Precision, group_size: int, rotate_record: bool) -> torch.Tensor:
    """x: [T, H, D] -> [T]: mean over heads of ||x - stored(x)|| / ||x||, the token's own
    quantization error at precision p (the "quality score" feature; rotation preserves norms)."""
    y = x.float().clamp(-MAX_QUANTIZED_ABS, MAX_QUANTIZED_ABS)
    if rotate_record:
        y = rotate(y)
    err = (fake_quantize(y, p, group_size) - y).norm(dim=-1)
    return (err / y.norm(dim=-1).clamp_min(1e-6)).mean(-1)


def relative_errors(x: torch.Tensor, precisions, group_size: int, rotate_record: bool) -> torch.Tensor:
    """The fast form of `relative_error` for several precisions at once: x: [T, H, D] -> [T, P].

    The same quantizer (outward-rounded fp16 scale and min), sharing the clamp, rotation, group
    ranges and norms across precisions and skipping `quantize`'s input checks and packing. This is
    what the worker computes for every written token of every layer; tests compare it with
    `relative_error`.
    """
    y = x.float().clamp(-MAX_QUANTIZED_ABS, MAX_QUANTIZED_ABS)
    if rotate_record:
        y = rotate(y)
    t, h, d = y.shape
    g = y.reshape(t, h, d // group_size, group_size)
    high = g.amax(-1)
    low = _outward_fp16(g.amin(-1), -torch.inf).float()  # [T, H, G]
    norm = y.norm(dim=-1).clamp_min(1e-6)  # [T, H]
    out = []
    for p in precisions:
        top = p.levels - 1
        scale = _outward_fp16((high - low) / top, torch.inf)
        short = low + scale.float() * top < high
        scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale).float()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
        codes = torch.round((g - low.unsqueeze(-1)) / safe).clamp(0, top)
        err = codes * scale.unsqueeze(-1) + low.unsqueeze(-1) - g  # [T, H, G, group]
        out.append((err.square().sum((-1, -2)).sqrt() / norm).mean(-1))
    return torch.stack(out, -1)


def fake_quantize_channels(x: torch.Tensor, p: Precision, group_size: int) -> torch.Tensor:
    """Per-channel quantization (KIVI-style keys): groups run along tokens, not channels.

    x: [num_tokens, head_size] with num_tokens a multiple of group_size (e.g. one page) -> fp32.
    """
    num_tokens = x.shape[0]
    if num_tokens % group_size:
        raise ValueError(f"per-channel groups need num_tokens divisible by {group_size}, got {num_tokens}")
    return fake_quantize(x.transpose(0, 1), p, group_size).transpose(0, 1)


def encode_records(x: torch.Tensor, p: Precision, layout: fmt.RecordLayout) -> torch.Tensor:
    """x: [n, head_size] (fp16/bf16; fp32 allowed for quantized) -> [n, record_bytes] uint8."""
    if x.ndim != 2 or x.shape[1] != layout.head_size:
        raise ValueError(f"expected [n, {layout.head_size}], got {list(x.shape)}")
    if not p.is_quantized:
        if x.dtype not in fmt.STORAGE_DTYPES:
            raise ValueError(f"16-bit records store {fmt.STORAGE_DTYPES} verbatim, got {x.dtype}")
        check_finite(x)
        return x.contiguous().view(torch.uint8).reshape(x.shape[0], -1)
    codes, scales, mins = quantize(x, p, layout.group_size)
    return fmt.join_record(fmt.pack_codes(codes, p), scales, mins)


def decode_records(
    records: torch.Tensor, p: Precision, layout: fmt.RecordLayout, storage_dtype: torch.dtype
) -> torch.Tensor:
    """records: [n, record_bytes] uint8 -> fp32 [n, head_size]."""
    if not p.is_quantized:
        return records.contiguous().view(storage_dtype).reshape(records.shape[0], -1).float()
    packed, scales, mins = fmt.split_record(records, layout, p)
    return dequantize(fmt.unpack_codes(packed, p), scales, mins, layout.group_size)


def pack_page(
    layout: fmt.PageLayout,
    key: torch.Tensor,
    value: torch.Tensor,
    key_bits: torch.Tensor,
    value_bits: torch.Tensor,
    rotate_keys: bool = False,
) -> torch.Tensor:
    """Seal one page. With rotate_keys, quantized key records hold rotated keys (16-bit ones never).

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
        for x, bits, is_key in ((key[:, head], key_bits, True), (value[:, head], value_bits, False)):
            order = layout.record_order(bits)
            for p, first, count, offset in layout.class_spans(bits, start):
                rows = x[order[first : first + count]]
                if is_key and rotate_keys and p.is_quantized:
                    rows = rotate(rows)
                rec = encode_records(rows, p, layout.record)
                page[offset : offset + rec.numel()] = rec.reshape(-1)
                start = offset + rec.numel()
    return page


def unpack_page(
    layout: fmt.PageLayout,
    page: torch.Tensor,
    num_tokens: int,
    storage_dtype: torch.dtype,
    rotate_keys: bool = False,
):
    """Inverse of pack_page: -> (key fp32 [n, H, D], value fp32 [n, H, D], key_bits [n], value_bits [n])."""
    key_bits, value_bits = fmt.decode_bit_map(page[: layout.header_bytes], num_tokens)
    h, d = layout.num_kv_heads, layout.record.head_size
    out = [torch.empty(num_tokens, h, d), torch.empty(num_tokens, h, d)]
    region = layout.region_bytes(key_bits, value_bits)
    for head in range(h):
        start = layout.head_region_offset(head, region)
        for x, bits, is_key in ((out[0], key_bits, True), (out[1], value_bits, False)):
            order = layout.record_order(bits)
            for p, first, count, offset in layout.class_spans(bits, start):
                size = layout.record.record_bytes(p)
                rec = page[offset : offset + count * size].reshape(count, size)
                decoded = decode_records(rec, p, layout.record, storage_dtype)
                if is_key and rotate_keys and p.is_quantized:
                    decoded = rotate(decoded)
                x[order[first : first + count], head] = decoded
                start = offset + count * size
    return out[0], out[1], key_bits, value_bits
