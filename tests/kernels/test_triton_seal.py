"""The Triton sealing kernel (kernels/triton_seal.py) against PageCodec.encode: bit-exact pages.

Without a GPU the kernel runs under Triton's interpreter, in a fresh process started by
`test_under_interpreter` (TRITON_INTERPRET must be set before anything imports triton; see
tests/attention/test_triton_decode.py); with a GPU the cases also run natively in this process.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adakv_vllm.kernels.page_codec import PageCodec
from adakv_vllm.quant import format as fmt
from adakv_vllm.quant.precision import ALL_BITS
from adakv_vllm.quant.rotation import rotate

pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else ("cuda" if torch.cuda.is_available() else None)
needs_kernel = pytest.mark.skipif(
    DEVICE is None, reason="no GPU: these cases run in the TRITON_INTERPRET=1 child (test_under_interpreter)"
)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    block_size: int = 32
    num_kv_heads: int = 3
    head_size: int = 64
    group_size: int = 32
    bits: str = "mixed"  # "mixed" (key and value independent) or one of ALL_BITS as str
    values: str = "normal"  # how K/V are drawn, see _values
    rotate_keys: bool = True
    dtype: torch.dtype = torch.bfloat16
    num_pages: int = 3


CASES = [
    Case("smollm2_mixed"),
    Case("smollm2_mixed_no_rotation", rotate_keys=False),
    Case("all_2_bit", bits="2"),
    Case("all_4_bit_fp16", bits="4", dtype=torch.float16),
    Case("all_8_bit", bits="8", rotate_keys=False),
    Case("all_16_bit", bits="16"),
    Case("one_token_block", block_size=1, num_kv_heads=2),
    Case("odd_block_head_80", block_size=17, num_kv_heads=2, head_size=80, group_size=16),
    Case("head_128_group_64_mha_like", block_size=8, num_kv_heads=4, head_size=128, group_size=64),
    Case("constant_groups", values="constant", rotate_keys=False),
    Case("rounding_ties", values="ties", rotate_keys=False, dtype=torch.float16),
    Case("near_max_quantized_abs", values="huge", rotate_keys=False),
    Case("tiny_subnormal", values="tiny", rotate_keys=False),
]


def _values(case: Case, gen: torch.Generator) -> torch.Tensor:
    """[2, n, block_size, H, D] keys and values, exact in case.dtype."""
    shape = (2, case.num_pages, case.block_size, case.num_kv_heads, case.head_size)
    x = torch.randn(shape, generator=gen)
    if case.values == "constant":  # zero-range groups, some of them not fp16 numbers
        x = x[..., :1].expand(shape) / 3
    elif case.values == "ties":  # values on a coarse grid: many codes land exactly on .5
        x = (x * 4).round() / 4
    elif case.values == "huge":  # up to MAX_QUANTIZED_ABS: fp16 scale/min near their range
        x = x.clamp(-1, 1) * 32768
    elif case.values == "tiny":  # bf16 subnormals and fp16-underflowing ranges
        x = x * 1e-38
    return x.to(case.dtype)


def _bits(case: Case, gen: torch.Generator):
    shape = (case.num_pages, case.block_size)
    if case.bits != "mixed":
        return torch.full(shape, int(case.bits)), torch.full(shape, int(case.bits))
    choices = torch.tensor(ALL_BITS)
    return choices[torch.randint(0, 4, shape, generator=gen)], choices[
        torch.randint(0, 4, shape, generator=gen)
    ]


def _codec(case: Case) -> PageCodec:
    bs, h = case.block_size, case.num_kv_heads
    record = fmt.RecordLayout(case.head_size, case.group_size)
    layout = fmt.PageLayout(bs, h, record, fmt.page_bytes_for_target(bs, h, record, 16, 16))
    return PageCodec(layout, case.dtype, case.rotate_keys)


def _seal():
    return importlib.import_module("adakv_vllm.kernels.triton_seal").seal_pages


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_pages_equal_the_codec(case):
    gen = torch.Generator().manual_seed(len(case.name))
    key, value = _values(case, gen)
    key_bits, value_bits = _bits(case, gen)
    codec = _codec(case)
    expected = codec.encode(key, value, key_bits, value_bits)
    pages = _seal()(codec, key.to(DEVICE), value.to(DEVICE), key_bits.to(DEVICE), value_bits.to(DEVICE))
    _assert_same_pages(pages.cpu(), expected, codec, key, key_bits)


def _assert_same_pages(pages, expected, codec, key, key_bits):
    """Byte-equal; on a GPU with rotate_keys, the rotation matmul may round differently from the
    CPU's: then all but the quantized key records must be equal and each key within one step."""
    if torch.equal(pages, expected):
        return
    assert DEVICE == "cuda" and codec.rotate_keys, "pages differ from PageCodec.encode"
    k_got, v_got, kb_got, vb_got = codec.decode(pages)
    k_exp, v_exp, kb_exp, vb_exp = codec.decode(expected)
    assert torch.equal(kb_got, kb_exp) and torch.equal(vb_got, vb_exp) and torch.equal(v_got, v_exp)
    group = codec.layout.record.group_size
    rotated = rotate(key).unflatten(-1, (-1, group))  # [n, T, H, G, group_size]
    levels = (2.0**key_bits - 1).reshape(*key_bits.shape, 1, 1, 1)
    step = (rotated.amax(-1, True) - rotated.amin(-1, True)) / levels  # one code step per group
    step = torch.where(key_bits.reshape(levels.shape) < 16, step, 0).expand_as(rotated).flatten(-2)
    # R is its own inverse: compare in the rotated space, element by element
    assert (rotate(k_got - k_exp).abs() <= step * 1.001 + 1e-5).all()


@needs_kernel
def test_in_place_rows_of_a_pool():
    """Shuffled destination rows of a strided pool full of garbage: exactly those rows become the
    codec's pages (slack zeroed), every other byte is untouched."""
    case = Case("pool", num_pages=4)
    gen = torch.Generator().manual_seed(7)
    key, value = _values(case, gen)
    key_bits, value_bits = _bits(case, gen)
    codec = _codec(case)
    page_bytes = codec.layout.page_bytes
    pool = torch.randint(0, 256, (9, page_bytes + 32), generator=gen, dtype=torch.uint8)  # padded rows
    before = pool.clone()
    rows = torch.tensor([7, 0, 4, 2])
    view = pool[:, :page_bytes].to(DEVICE)
    _seal()(
        codec,
        key.to(DEVICE),
        value.to(DEVICE),
        key_bits.to(DEVICE),
        value_bits.to(DEVICE),
        view,
        rows.to(DEVICE),
    )
    pool[:, :page_bytes] = view.cpu()
    _assert_same_pages(
        pool[rows, :page_bytes], codec.encode(key, value, key_bits, value_bits), codec, key, key_bits
    )
    untouched = torch.ones(9, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(pool[untouched], before[untouched]) and torch.equal(
        pool[:, page_bytes:], before[:, page_bytes:]
    )


def test_invalid_inputs_raise_value_error():
    case = Case("v", num_pages=1)
    codec = _codec(case)
    key, value = _values(case, torch.Generator().manual_seed(0))
    bits = torch.full((1, 32), 4)
    seal = _seal()
    with pytest.raises(ValueError, match="bits must be in"):
        seal(codec, key, value, torch.full((1, 32), 3), bits)
    with pytest.raises(ValueError, match="must be \\[n, 32, 3, 64\\]"):
        seal(codec, key[:, :16], value[:, :16], bits[:, :16], bits[:, :16])
    with pytest.raises(ValueError, match="dtype must be one of"):
        seal(codec, key.float(), value.float(), bits, bits)
    small = fmt.PageLayout(
        32, 3, codec.layout.record, fmt.page_bytes_for_target(32, 3, codec.layout.record, 4, 4)
    )
    with pytest.raises(ValueError, match="page budget"):
        seal(PageCodec(small, torch.bfloat16), key, value, torch.full((1, 32), 8), bits)
    bad = key.clone()
    bad[0, 3, 1, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        seal(codec, bad, value, bits, bits)
    with pytest.raises(ValueError, match="store them at 16 bits"):
        seal(codec, key, value * 1e5, bits, bits)


def test_under_interpreter(request):
    """Run this file's kernel cases on CPU in a fresh process with TRITON_INTERPRET=1."""
    if INTERPRETED:
        pytest.skip("this is the interpreted child")
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    if request.config.option.markexpr:
        cmd += ["-m", request.config.option.markexpr]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"interpreted run failed:\n{done.stdout[-8000:]}\n{done.stderr[-4000:]}"
