"""The fp32 oracle: reconstruction bounds, lossless FP16, bit-exact pages, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adakv_vllm.quant import format as fmt
from adakv_vllm.quant import reference as ref
from adakv_vllm.quant.precision import ALL_BITS, Precision
from adakv_vllm.quant.rotation import rotate, rotation_matrix

QUANTIZED = [Precision.INT2, Precision.INT4, Precision.INT8]
STORAGE = [torch.bfloat16, torch.float16]


def _within_bound(x: torch.Tensor, p: Precision, group_size: int) -> None:
    codes, scales, mins = ref.quantize(x, p, group_size)
    err = (ref.dequantize(codes, scales, mins, group_size) - x.float()).abs()
    assert (err <= ref.error_bound(scales, x, group_size)).all()


@pytest.mark.parametrize("p", QUANTIZED)
@pytest.mark.parametrize("group_size", [16, 32, 64, 128])
def test_error_within_bound(p, group_size):
    x = torch.randn(33, 128, generator=torch.Generator().manual_seed(0)) * 3
    _within_bound(x, p, group_size)


@pytest.mark.parametrize("dtype", STORAGE)
def test_fp16_records_lossless(dtype):
    x = (torch.randn(9, 64) * 100).to(dtype)
    layout = fmt.RecordLayout(64, 32)
    rec = ref.encode_records(x, Precision.FP16, layout)
    assert rec.shape == (9, layout.record_bytes(Precision.FP16))
    assert torch.equal(ref.decode_records(rec, Precision.FP16, layout, dtype).to(dtype), x)


@pytest.mark.parametrize("p", QUANTIZED)
def test_records_bit_exact_roundtrip(p):
    layout = fmt.RecordLayout(64, 16)
    x = torch.randn(7, 64).bfloat16()
    rec = ref.encode_records(x, p, layout)
    assert rec.shape == (7, layout.record_bytes(p))
    packed, scales, mins = fmt.split_record(rec, layout, p)
    assert torch.equal(fmt.join_record(packed, scales, mins), rec)
    # Re-encoding the decoded values reproduces the same bytes: the grid is stable.
    again = ref.encode_records(ref.decode_records(rec, p, layout, torch.bfloat16), p, layout)
    assert torch.equal(again, rec)


@pytest.mark.parametrize("p", QUANTIZED)
@pytest.mark.parametrize("value", [0.0, 1.5, -3.25, 1000.0])
def test_constant_vectors_exact(p, value):
    x = torch.full((2, 64), value)
    assert torch.equal(ref.fake_quantize(x, p, 32), x)


finite = st.floats(min_value=-30000, max_value=30000, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5),
    head_size=st.sampled_from([32, 64, 96, 128]),
    group_size=st.sampled_from([16, 32]),
    p=st.sampled_from(QUANTIZED),
    data=st.data(),
)
def test_property_bound_and_exact_bytes(rows, head_size, group_size, p, data):
    values = data.draw(st.lists(finite, min_size=rows * head_size, max_size=rows * head_size))
    x = torch.tensor(values, dtype=torch.float32).reshape(rows, head_size)
    _within_bound(x, p, group_size)
    layout = fmt.RecordLayout(head_size, group_size)
    rec = ref.encode_records(x, p, layout)
    packed, scales, mins = fmt.split_record(rec, layout, p)
    assert torch.equal(fmt.pack_codes(fmt.unpack_codes(packed, p), p), packed)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rejected(bad):
    x = torch.zeros(1, 64)
    x[0, 3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        ref.encode_records(x, Precision.INT4, fmt.RecordLayout(64, 32))
    with pytest.raises(ValueError, match="NaN or inf"):
        ref.encode_records(x.bfloat16(), Precision.FP16, fmt.RecordLayout(64, 32))


def test_bad_inputs_rejected():
    layout = fmt.RecordLayout(64, 32)
    with pytest.raises(ValueError, match="floating-point"):
        ref.quantize(torch.zeros(1, 64, dtype=torch.int32), Precision.INT4, 32)
    with pytest.raises(ValueError, match=r"expected \[n, 64\]"):
        ref.encode_records(torch.zeros(1, 32), Precision.INT4, layout)
    with pytest.raises(ValueError, match="verbatim"):
        ref.encode_records(torch.zeros(1, 64), Precision.FP16, layout)
    with pytest.raises(ValueError, match="16 bits"):
        ref.encode_records(torch.full((1, 64), 1e5), Precision.INT8, layout)


def _page_case(block_size: int, num_tokens: int, target: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    record = fmt.RecordLayout(64, 32)
    layout = fmt.PageLayout(
        block_size, 3, record, fmt.page_bytes_for_target(block_size, 3, record, target, target)
    )
    key = torch.randn(num_tokens, 3, 64, generator=g).bfloat16()
    value = torch.randn(num_tokens, 3, 64, generator=g).bfloat16()
    choices = torch.tensor(ALL_BITS)
    while True:  # draw random bits until they fit the budget
        kb = choices[torch.randint(0, 4, (num_tokens,), generator=g)]
        vb = choices[torch.randint(0, 4, (num_tokens,), generator=g)]
        if layout.fits(kb, vb):
            return layout, key, value, kb, vb


@pytest.mark.parametrize("block_size,num_tokens", [(16, 16), (16, 1), (17, 9), (128, 128)])
def test_page_roundtrip(block_size, num_tokens):
    layout, key, value, kb, vb = _page_case(block_size, num_tokens, 8, seed=block_size + num_tokens)
    page = ref.pack_page(layout, key, value, kb, vb)
    assert page.shape == (layout.page_bytes,) and page.dtype == torch.uint8
    k2, v2, kb2, vb2 = ref.unpack_page(layout, page, num_tokens, torch.bfloat16)
    assert torch.equal(kb2, kb) and torch.equal(vb2, vb)
    for x, x2, bits in ((key, k2, kb), (value, v2, vb)):
        for t in range(num_tokens):
            expect = ref.fake_quantize(x[t], Precision(int(bits[t])), 32)
            assert torch.equal(x2[t], expect)
    # The slack after the used bytes stays zero: nothing is written past the records.
    assert not page[layout.used_bytes(kb, vb) :].any()


def test_page_over_budget_rejected():
    record = fmt.RecordLayout(64, 32)
    layout = fmt.PageLayout(16, 3, record, fmt.page_bytes_for_target(16, 3, record, 4, 4))
    kv = torch.zeros(16, 3, 64).bfloat16()
    with pytest.raises(ValueError, match="page holds"):
        ref.pack_page(layout, kv, kv, torch.full((16,), 16), torch.full((16,), 4))


@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
def test_rotation_orthonormal_involution(head_size):
    r = rotation_matrix(head_size)
    torch.testing.assert_close(r @ r.T, torch.eye(head_size), atol=1e-6, rtol=0)
    q, k = torch.randn(4, head_size), torch.randn(4, head_size)
    # fp32 matmul rounding over <= 256 terms of O(1) values: 1e-4 absolute.
    torch.testing.assert_close(rotate(q) @ rotate(k).T, q @ k.T, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(rotate(rotate(q)), q, atol=1e-5, rtol=1e-5)


def test_per_channel_requires_whole_groups():
    with pytest.raises(ValueError, match="divisible"):
        ref.fake_quantize_channels(torch.randn(10, 64), Precision.INT2, 16)
    x = torch.randn(32, 64)
    out = ref.fake_quantize_channels(x, Precision.INT8, 16)
    assert out.shape == x.shape and (out - x).abs().max() < 0.05


@pytest.mark.parametrize("rotate_record", [False, True])
@pytest.mark.parametrize("group_size", [32, 64])
def test_fast_relative_errors_match_the_exact_quantizer(rotate_record, group_size):
    from adakv_vllm.quant.reference import relative_error, relative_errors

    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(40, 3, 64, generator=gen) * torch.linspace(0.1, 8, 64)).bfloat16()
    x[0, 0] = 1.5  # a constant group: zero error
    precisions = [Precision.parse(b) for b in (2, 4, 8)]
    fast = relative_errors(x, precisions, group_size, rotate_record)
    exact = torch.stack([relative_error(x, p, group_size, rotate_record) for p in precisions], -1)
    # the same quantizer; only the summation order of the norms differs
    torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-7)
