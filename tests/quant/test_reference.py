"""The fp32 oracle: the codebook quantizer, the exact rotation, lossless FP16, bit-exact pages, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adakv_vllm.quant import format as fmt
from adakv_vllm.quant import levels
from adakv_vllm.quant import reference as ref
from adakv_vllm.quant.precision import ALL_BITS, Precision
from adakv_vllm.quant.rotation import fwht, rotate, rotation_matrix, unrotate

QUANTIZED = [Precision.INT2, Precision.INT3, Precision.INT4, Precision.INT8]
STORAGE = [torch.bfloat16, torch.float16]
# Relative L2 error of a Gaussian vector at each precision (Lloyd-Max: 0.34, 0.19, 0.10 at 2/3/4
# bits; the per-group absmax scale search costs a little): upper bounds with margin.
GAUSSIAN_ERROR = {2: 0.36, 3: 0.20, 4: 0.11, 8: 0.01}


@pytest.mark.parametrize("p", QUANTIZED)
@pytest.mark.parametrize("group_size", [16, 32, 64, 128])
def test_gaussian_error_and_codes_in_range(p, group_size):
    y = torch.randn(200, 128, generator=torch.Generator().manual_seed(0)) * 3
    codes, scales = ref.quantize(y, p, group_size)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2**p.bits
    assert scales.dtype == torch.float16 and scales.shape == (200, 128 // group_size)
    err = (ref.dequantize(codes, scales, p, group_size) - y).norm(dim=-1) / y.norm(dim=-1)
    assert err.mean() < GAUSSIAN_ERROR[p.bits]


@pytest.mark.parametrize("p", QUANTIZED)
def test_the_chosen_scale_is_the_best_candidate(p):
    """Exhaustive check of the clip search on a few groups: no candidate scale does better."""
    y = torch.randn(8, 64, generator=torch.Generator().manual_seed(p.bits)) * 2
    y[0, 5] = 40.0  # an outlier: clipping it should win at low bits
    codes, scales = ref.quantize(y, p, 64)
    chosen = (ref.dequantize(codes, scales, p, 64) - y).square().sum(-1)
    table, top = levels.LEVELS[p.bits], levels.LEVELS[p.bits][-1]
    for f in levels.CLIP_FACTORS[p.bits]:
        s = ((y.abs().amax(-1) * f) / top).half().float().unsqueeze(-1)
        nearest = (y.unsqueeze(-1) / s.unsqueeze(-1) - table).abs().argmin(-1)
        other = (table[nearest] * s - y).square().sum(-1)
        assert (chosen <= other * (1 + 1e-6)).all()


@pytest.mark.parametrize("p", QUANTIZED)
def test_zero_groups_store_scale_zero(p):
    codes, scales = ref.quantize(torch.zeros(2, 64), p, 32)
    assert (scales == 0).all() and (codes == levels.zero_code(p.bits)).all()
    assert torch.equal(ref.dequantize(codes, scales, p, 32).abs(), torch.zeros(2, 64))


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
    packed, scales = fmt.split_record(rec, layout, p)
    assert torch.equal(fmt.join_record(packed, scales), rec)
    decoded = ref.decode_records(rec, p, layout, torch.bfloat16)
    assert torch.equal(decoded, ref.stored_kv(x, p, 16))


finite = st.floats(min_value=-30000, max_value=30000, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5),
    head_size=st.sampled_from([32, 64, 96, 128]),
    group_size=st.sampled_from([16, 32]),
    p=st.sampled_from(QUANTIZED),
    data=st.data(),
)
def test_property_no_worse_than_no_clipping_and_exact_bytes(rows, head_size, group_size, p, data):
    values = data.draw(st.lists(finite, min_size=rows * head_size, max_size=rows * head_size))
    x = torch.tensor(values, dtype=torch.float32).reshape(rows, head_size) / 8  # norms stay storable
    y = rotate(x)
    codes, scales = ref.quantize(y, p, group_size)
    err = (ref.dequantize(codes, scales, p, group_size) - y).reshape(rows, -1, group_size).square().sum(-1)
    # f = 1 (no clipping) maps each group's absmax to the top level: every element within half a
    # level gap of the grid, so the chosen error is at most that of the unclipped grid
    gaps = (levels.LEVELS[p.bits][1:] - levels.LEVELS[p.bits][:-1]).max()
    step = y.reshape(rows, -1, group_size).abs().amax(-1) / levels.LEVELS[p.bits][-1] * gaps
    bound = (step / 2) ** 2 * group_size
    assert (err <= bound * 1.01 + 1e-6).all()
    layout = fmt.RecordLayout(head_size, group_size)
    rec = ref.encode_records(x, p, layout)
    packed, _ = fmt.split_record(rec, layout, p)
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
    # a row of 32768s (the clamp) rotates to 8 * 32768 in one channel: beyond the fp16 scale
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
        kb = choices[torch.randint(0, len(ALL_BITS), (num_tokens,), generator=g)]
        vb = choices[torch.randint(0, len(ALL_BITS), (num_tokens,), generator=g)]
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
            expect = ref.stored_kv(x[t], Precision(int(bits[t])), 32)
            assert torch.equal(x2[t], expect)
    # The slack after the used bytes stays zero: nothing is written past the records.
    assert not page[layout.used_bytes(kb, vb) :].any()


def test_page_over_budget_rejected():
    record = fmt.RecordLayout(64, 32)
    layout = fmt.PageLayout(16, 3, record, fmt.page_bytes_for_target(16, 3, record, 4, 4))
    kv = torch.zeros(16, 3, 64).bfloat16()
    with pytest.raises(ValueError, match="page holds"):
        ref.pack_page(layout, kv, kv, torch.full((16,), 16), torch.full((16,), 4))


@pytest.mark.parametrize("head_size", [32, 64, 80, 96, 128, 256])
def test_rotation_is_exact_butterflies_and_inverts(head_size):
    r = rotation_matrix(head_size)
    block = head_size & -head_size
    # orthonormal for block 16/64/256, sqrt(2) times orthonormal for 32/128 (a power-of-two scale)
    gain = 2.0 if (block.bit_length() - 1) % 2 else 1.0
    torch.testing.assert_close(r @ r.T, gain * torch.eye(head_size), atol=1e-6, rtol=0)
    q = torch.randn(4, head_size)
    torch.testing.assert_close(rotate(q), q @ r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unrotate(rotate(q)), q, atol=1e-5, rtol=1e-5)
    # the butterflies fix every rounding: rows give the same bits alone or in any batch
    assert torch.equal(fwht(q)[1:2], fwht(q[1:2]))


def test_relative_errors_are_the_records_own_errors():
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(40, 3, 64, generator=gen) * torch.linspace(0.1, 8, 64)).bfloat16()
    precisions = [Precision.parse(b) for b in (2, 4, 8)]
    got = ref.relative_errors(x, precisions, 32)
    for i, p in enumerate(precisions):
        stored = ref.stored_kv(x, p, 32)
        direct = ((stored - x.float()).norm(dim=-1) / x.float().norm(dim=-1)).mean(-1)
        # the same quantizer; the error is measured before (here) or after rotating back
        torch.testing.assert_close(got[:, i], direct, rtol=1e-4, atol=1e-6)
    assert (got[:, 0] > got[:, 1]).all() and (got[:, 1] > got[:, 2]).all()
