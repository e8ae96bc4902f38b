"""The compiled quantization-error feature (kernels/csrc/cpu_qerr.cpp) against its torch oracle
quant.reference.relative_errors (itself tested equal to the exact quantizer in tests/quant)."""

from __future__ import annotations

import pytest
import torch

from adakv_vllm.blocks import store as store_module
from adakv_vllm.kernels import cpu, library
from adakv_vllm.quant.precision import Precision
from adakv_vllm.quant.reference import relative_errors

PRECISIONS = [Precision.parse(b) for b in (2, 4, 8)]


@pytest.fixture(scope="module")
def module():
    return library.build()


def _tokens(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen) * torch.linspace(0.1, 8, shape[-1])  # outlier channels
    x[0, 0] = 1.5  # a constant row: every group constant, zero error
    x[1, 0] = 0.0  # an all-zero head: the norm's 1e-6 floor
    x[2, 0, :4] = 30000.0  # near the quantizable limit
    x[3, 0] = 1.0 / 3.0  # constant but not an fp16 number: the outward min leaves an error
    return x


@pytest.mark.parametrize(
    ("head_size", "group_size"), [(64, 32), (64, 64), (64, 16), (80, 16), (128, 64), (128, 32)]
)
@pytest.mark.parametrize("rotate_record", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_matches_the_torch_oracle(module, head_size, group_size, rotate_record, dtype):
    x = _tokens((257, 3, head_size), seed=head_size + group_size).to(dtype)
    expected = relative_errors(x, PRECISIONS, group_size, rotate_record)
    got = cpu.relative_errors(x, PRECISIONS, group_size, rotate_record, module)
    # The same quantizer step by step (no FMA contraction); only the summation order of the norms
    # differs (measured max relative difference ~5e-7).
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_every_code_path_of_the_rounding(module):
    """Values on rounding boundaries: x - min exactly k + 0.5 scale steps (round half to even)."""
    group = 32
    steps = torch.arange(group, dtype=torch.float32) * 0.5  # 0, 0.5, 1, 1.5, ... in 2-bit steps of 1
    x = torch.stack([steps, -steps, steps * 1024, steps / 1024])[:, None, :].repeat(1, 2, 2)  # [4, 2, 64]
    expected = relative_errors(x, PRECISIONS, group, False)
    torch.testing.assert_close(cpu.relative_errors(x, PRECISIONS, group, False, module), expected)


def test_bad_arguments_raise(module):
    with pytest.raises(ValueError, match="multiple of group_size"):
        cpu.relative_errors(torch.randn(4, 3, 64), PRECISIONS, 48, False, module)


def test_the_store_uses_the_kernel_and_falls_back_to_torch(monkeypatch):
    x = _tokens((40, 3, 64), seed=1).bfloat16()
    compiled = store_module._relative_errors(x, 32, True)
    monkeypatch.setattr(library, "load", lambda: None)  # no compiler here
    fallback = store_module._relative_errors(x, 32, True)
    torch.testing.assert_close(compiled, fallback, rtol=1e-5, atol=1e-7)
