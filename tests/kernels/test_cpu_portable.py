"""The compiled library built for a CPU without AVX-512, BMI2 or FMA (-march=x86-64-v2): the portable
branches of csrc/cpu_quant.h (the seal's and the feature's vector helpers), the decode kernel's
scalar path and the page decoder's portable path, against the same oracles as the native build. The
machine's own build covers the AVX-512 branches (test_cpu_seal.py, test_cpu_qerr.py,
test_cpu_decode.py, test_cpu_unpack.py); this module builds once more (some seconds) into its own
cache folder."""

from __future__ import annotations

import platform

import pytest
import torch

from adakv_vllm.kernels import cpu, library
from adakv_vllm.kernels.attention_ref import paged_attention_ref
from adakv_vllm.kernels.page_codec import PageCodec
from adakv_vllm.quant.precision import Precision
from adakv_vllm.quant.reference import relative_errors
from tests.kernels import test_cpu_decode as decode_tests
from tests.kernels import test_cpu_qerr as qerr_tests
from tests.kernels import test_cpu_seal as seal_tests
from tests.kernels import test_cpu_unpack as unpack_tests

PORTABLE_CFLAGS = ("-O3", "-march=x86-64-v2", "-fopenmp", "-ffp-contract=off")
pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="an x86-64 baseline build")


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(library, "CFLAGS", PORTABLE_CFLAGS)
        mp.setenv("ADAKV_CACHE_DIR", str(tmp_path_factory.mktemp("portable") / "cache"))
        module = library.build()
    assert not module.has_avx512()
    return module


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_portable_seal_equals_the_codec(portable, dtype):
    case = seal_tests.Case("portable", block_size=16, num_kv_heads=2, head_size=80, group_size=16)
    layout = seal_tests._layout(case)
    gen = torch.Generator().manual_seed(1)
    key, value = seal_tests._kv(4, layout, dtype, gen)
    seal_tests._adversarial(key, value, case.group_size)
    kb, vb = seal_tests._bits(case, layout, 4, gen)
    expected = PageCodec(layout, dtype).encode(key, value, kb, vb)
    assert torch.equal(cpu.encode_pages(key, value, kb, vb, layout, dtype, portable), expected)


def test_portable_relative_errors_match_the_oracle(portable):
    x = qerr_tests._tokens((64, 3, 64), seed=4).bfloat16()
    precisions = [Precision.parse(b) for b in (2, 3, 4, 8)]
    torch.testing.assert_close(
        cpu.relative_errors(x, precisions, 32, portable),
        relative_errors(x, precisions, 32),
        rtol=qerr_tests.RTOL,
        atol=qerr_tests.ATOL,
    )


def test_portable_decode_matches_the_oracle(portable):
    case = decode_tests.Case("portable", (70, 33, 5), open_blocks="random")
    args, codec = decode_tests._problem(case)
    expected = paged_attention_ref(codec=codec, scale=0.125, **args)
    out = cpu.paged_attention(**args, layout=codec.layout, scale=0.125, module=portable)
    owned = int(args["query_start_loc"][-1])
    rtol, atol = decode_tests.TOLERANCES[case.query_dtype]
    torch.testing.assert_close(out[:owned], expected[:owned], rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_size, group_size", [(80, 16), (128, 32)])
def test_portable_unpack_equals_the_codec(portable, dtype, head_size, group_size):
    case = seal_tests.Case(
        "portable", block_size=16, num_kv_heads=2, head_size=head_size, group_size=group_size
    )
    storage, rows, codec = unpack_tests._strided_pages(case, dtype, 4, seed=head_size)
    pages = storage[:, : codec.layout.page_bytes]
    key, value = cpu.decode_pages(pages, rows, codec.layout, dtype, portable)
    expected_key, expected_value = unpack_tests._expected(codec, pages, rows)
    assert torch.equal(key, expected_key) and torch.equal(value, expected_value)


def test_portable_block_attention_matches_attend(portable):
    from tests.kernels import test_cpu_block_attn as block_tests

    got, expected = block_tests._both(*block_tests._case("mixed", torch.bfloat16, seed=5), portable)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
