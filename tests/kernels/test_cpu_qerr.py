"""The compiled quantization-error feature (kernels/csrc/cpu_qerr.cpp) against its torch oracle
quant.reference.relative_errors (itself tested equal to the records' own errors in tests/quant)."""

from __future__ import annotations

import pytest
import torch

from adakv_vllm.blocks import store as store_module
from adakv_vllm.kernels import cpu, library
from adakv_vllm.quant.precision import Precision
from adakv_vllm.quant.reference import MAX_QUANTIZED_ABS, relative_errors

PRECISIONS = [Precision.parse(b) for b in (2, 3, 4, 8)]
# The same quantizer step by step (the same codes and scales); the kernel sums the squared errors and
# norms in fp64 where the oracle's torch norms sum in fp32 (measured max relative difference ~3e-7).
RTOL, ATOL = 1e-5, 1e-7


@pytest.fixture(scope="module")
def module():
    return library.build()


def _tokens(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen) * torch.linspace(0.1, 8, shape[-1])  # outlier channels
    x[0, 0] = 1.5  # a constant row: one spike per Hadamard block, zero groups beside it
    x[1, 0] = 0.0  # an all-zero head: scale 0 everywhere and the norm's 1e-6 floor
    x[2, 0, :2] = MAX_QUANTIZED_ABS  # at the clamp
    x[3, 0, :2] = 2.0 * MAX_QUANTIZED_ABS  # beyond it: clamped, as the oracle does
    x[4, 0] = 0.0
    x[4, 0, 0] = 2.0**-21  # the larger candidate scales subnormal fp16, the smaller ones 0
    x[5, 0] = 2.0**-20 * torch.arange(shape[-1])  # tiny ranges: subnormal fp16 scales
    return x


@pytest.mark.parametrize(
    ("head_size", "group_size"),
    [(64, 32), (64, 64), (64, 16), (80, 16), (32, 16), (48, 16), (96, 32), (128, 64), (128, 32), (256, 128)],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_matches_the_torch_oracle(module, head_size, group_size, dtype):
    x = _tokens((257, 3, head_size), seed=head_size + group_size).to(dtype)
    expected = relative_errors(x, PRECISIONS, group_size)
    got = cpu.relative_errors(x, PRECISIONS, group_size, module)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


def test_any_subset_of_precisions_in_any_order(module):
    x = _tokens((40, 2, 64), seed=2)
    subset = [Precision.INT8, Precision.INT3]
    torch.testing.assert_close(
        cpu.relative_errors(x, subset, 32, module), relative_errors(x, subset, 32), rtol=RTOL, atol=ATOL
    )


def test_values_the_oracle_refuses_raise_as_it_does(module):
    x = _tokens((8, 2, 64), seed=3)
    nan = x.clone()
    nan[5, 1, 7] = float("nan")
    inf = x.clone()
    inf[5, 1, 7] = float("inf")  # clamped, not an error
    long_row = x.clone()
    long_row[2, 1] = MAX_QUANTIZED_ABS  # a row of clamped values rotates beyond the fp16 scale's range
    for bad, match in ((nan, "NaN or inf"), (long_row, "16 bits")):
        for fn in (relative_errors, lambda *a: cpu.relative_errors(*a, module)):
            with pytest.raises(ValueError, match=match):
                fn(bad, PRECISIONS, 32)
    torch.testing.assert_close(
        cpu.relative_errors(inf, PRECISIONS, 32, module),
        relative_errors(inf, PRECISIONS, 32),
        rtol=RTOL,
        atol=ATOL,
    )


def test_bad_arguments_raise(module):
    with pytest.raises(ValueError, match="multiple of group_size"):
        cpu.relative_errors(torch.randn(4, 3, 64), PRECISIONS, 48, module)
    with pytest.raises(ValueError, match="head_size"):
        cpu.relative_errors(torch.randn(4, 3, 40), PRECISIONS, 8, module)
    with pytest.raises(ValueError, match="quantized"):
        cpu.relative_errors(torch.randn(4, 3, 64), [Precision.FP16], 32, module)


def test_the_store_uses_the_kernel_and_falls_back_to_torch(monkeypatch):
    x = _tokens((40, 3, 64), seed=1).bfloat16()
    compiled = store_module._relative_errors(x, 32)
    monkeypatch.setattr(library, "load", lambda: None)  # no compiler here
    fallback = store_module._relative_errors(x, 32)
    torch.testing.assert_close(compiled, fallback, rtol=RTOL, atol=ATOL)
