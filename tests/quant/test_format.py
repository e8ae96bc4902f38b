"""Byte layout: sizes, bit maps, code packing. Everything here is exact."""

from __future__ import annotations

import pytest
import torch

from adakv_vllm.quant import format as fmt
from adakv_vllm.quant.precision import ALL_BITS, PRECISIONS, Precision

HEAD_SIZES = [32, 64, 80, 96, 128, 256]
GROUP_SIZES = [16, 32, 64, 128]


@pytest.mark.parametrize("head_size", HEAD_SIZES)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_record_bytes(head_size, group_size):
    if head_size % group_size:
        with pytest.raises(ValueError, match="group_size"):
            fmt.RecordLayout(head_size, group_size)
        return
    layout = fmt.RecordLayout(head_size, group_size)
    groups = head_size // group_size
    assert layout.record_bytes(Precision.FP16) == 2 * head_size
    for p in (Precision.INT2, Precision.INT3, Precision.INT4, Precision.INT8):
        assert layout.record_bytes(p) == head_size * p.bits // 8 + 2 * groups  # codes + fp16 scales
        assert layout.scales_offset(p) == head_size * p.bits // 8
        assert layout.bits_per_element(p) == p.bits + 16 / group_size


@pytest.mark.parametrize("head_size", [0, 8, 24, 48 + 1, 272, 512])
def test_unsupported_head_size(head_size):
    with pytest.raises(ValueError, match="head_size"):
        fmt.RecordLayout(head_size, 16)


def test_interpolated_bytes():
    layout = fmt.RecordLayout(64, 32)
    for p in PRECISIONS:
        assert layout.interpolated_bytes(p.bits) == layout.record_bytes(p)
    assert (
        layout.interpolated_bytes(3.5)
        == (layout.record_bytes(Precision.INT3) + layout.record_bytes(Precision.INT4)) / 2
    )
    for bad in (1.9, 16.5, -1):
        with pytest.raises(ValueError, match=r"\[2, 16\]"):
            layout.interpolated_bytes(bad)


@pytest.mark.parametrize("block_size", [1, 16, 17, 128])
@pytest.mark.parametrize("target", [2, 2.5, 3, 3.5, 4, 8, 16])
def test_page_budget_holds_uniform_bits(block_size, target):
    record = fmt.RecordLayout(64, 32)
    page_bytes = fmt.page_bytes_for_target(block_size, 3, record, target, target)
    layout = fmt.PageLayout(block_size, 3, record, page_bytes)
    assert page_bytes % fmt.PAGE_ALIGN == 0 and layout.header_bytes % fmt.HEADER_ALIGN == 0
    floor = max(p.bits for p in PRECISIONS if p.bits <= target)
    bits = torch.full((block_size,), floor)
    assert layout.fits(bits, bits)
    expected = layout.header_bytes + 3 * block_size * 2 * record.record_bytes(Precision(floor))
    assert layout.used_bytes(bits, bits) == expected
    if target < 16:  # one token above the target precision everywhere must not fit
        above = torch.full((block_size,), min(p.bits for p in PRECISIONS if p.bits > target))
        assert not layout.fits(above, above) or block_size == 1


def test_page_too_small_rejected():
    record = fmt.RecordLayout(64, 32)
    with pytest.raises(ValueError, match="page_bytes"):
        fmt.PageLayout(16, 3, record, 100)


@pytest.mark.parametrize("num_tokens", [1, 7, 16])
def test_bit_map_roundtrip(num_tokens):
    g = torch.Generator().manual_seed(num_tokens)
    choices = torch.tensor(ALL_BITS)
    kb = choices[torch.randint(0, len(ALL_BITS), (num_tokens,), generator=g)]
    vb = choices[torch.randint(0, len(ALL_BITS), (num_tokens,), generator=g)]
    header = fmt.encode_bit_map(kb, vb, 16)
    assert header.dtype == torch.uint8 and header.shape == (16,)
    assert torch.equal(header[num_tokens:], torch.zeros(16 - num_tokens, dtype=torch.uint8))
    k2, v2 = fmt.decode_bit_map(header, num_tokens)
    assert torch.equal(k2, kb) and torch.equal(v2, vb)


def test_bit_map_rejects_bad_bits():
    with pytest.raises(ValueError, match="bits must be in"):
        fmt.encode_bit_map(torch.tensor([5]), torch.tensor([4]), 16)


@pytest.mark.parametrize("p", [Precision.INT2, Precision.INT3, Precision.INT4, Precision.INT8])
def test_pack_codes_bit_exact(p):
    g = torch.Generator().manual_seed(p.bits)
    codes = torch.randint(0, p.levels, (5, 64), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = fmt.pack_codes(codes, p)
    assert packed.shape == (5, 64 * p.bits // 8)
    assert torch.equal(fmt.unpack_codes(packed, p), codes)


def test_pack_codes_little_endian():
    # elements 0..3 = 1, 2, 3, 0 at 2 bits -> 0b00_11_10_01
    codes = torch.tensor([[1, 2, 3, 0] * 4], dtype=torch.uint8)
    assert fmt.pack_codes(codes, Precision.INT2)[0, 0].item() == 0b00111001
    codes4 = torch.tensor([[0xA, 0x5] * 8], dtype=torch.uint8)
    assert fmt.pack_codes(codes4, Precision.INT4)[0, 0].item() == 0x5A
    # 3 bits: a little-endian bit stream, codes straddle bytes. Codes 1..7, 0 -> bits
    # 100 010 110 001 101 011 111 000 (LSB first) -> bytes 0b10_001_001 ... as integers:
    codes3 = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0] * 2], dtype=torch.uint8)
    stream = sum(c << (3 * i) for i, c in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    assert fmt.pack_codes(codes3, Precision.INT3)[0, :3].tolist() == list(stream.to_bytes(3, "little"))


def test_bit_map_nibbles():
    raw = fmt.join_codes(torch.tensor([0, 4, 2]), torch.tensor([3, 1, 4]))
    assert raw.tolist() == [0x30, 0x14, 0x42]
    k, v = fmt.split_codes(raw)
    assert k.tolist() == [0, 4, 2] and v.tolist() == [3, 1, 4]


def test_record_order_sorts_by_precision_then_position():
    layout = fmt.PageLayout(8, 1, fmt.RecordLayout(64, 32), 4096)
    bits = torch.tensor([16, 2, 4, 2, 16, 8, 3, 2])
    assert layout.record_order(bits).tolist() == [1, 3, 7, 6, 2, 5, 0, 4]
    spans = layout.class_spans(bits, 100)
    assert [(p.bits, first, count) for p, first, count, _ in spans] == [
        (2, 0, 3),
        (3, 3, 1),
        (4, 4, 1),
        (8, 5, 1),
        (16, 6, 2),
    ]
    assert spans[1][3] == 100 + 3 * layout.record.record_bytes(Precision.INT2)


def test_precision_parse():
    assert Precision.parse(4) is Precision.INT4 and Precision.parse(3) is Precision.INT3
    for bad in (5, "x", None, 32):
        with pytest.raises(ValueError, match=r"\(2, 3, 4, 8, 16\)"):
            Precision.parse(bad)
