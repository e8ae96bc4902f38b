"""The Triton sealing kernel (kernels/triton_seal.py) against PageCodec.encode: bit-exact pages.

Without a GPU the kernel runs under Triton's interpreter, in a fresh process started by
`test_under_interpreter` (TRITON_INTERPRET must be set before anything imports triton; see
tests/kernels/test_triton_decode.py); with a GPU the cases also run natively in this process.
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
from adakv_vllm.quant.reference import MAX_QUANTIZED_ABS, MAX_ROTATED_ABS
from adakv_vllm.quant.rotation import hadamard_block, rotate, unrotate

pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else ("cuda" if torch.cuda.is_available() else None)
needs_kernel = pytest.mark.skipif(
    DEVICE is None, reason="no GPU: these cases run in the TRITON_INTERPRET=1 child (test_under_interpreter)"
)
# bits drawn per token ("mixed": every precision; "low": the Gaussian codebooks only)
BIT_CHOICES = {"mixed": ALL_BITS, "low": (2, 3, 4)}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    block_size: int = 32
    num_kv_heads: int = 3
    head_size: int = 64
    group_size: int = 32
    bits: str = "mixed"  # a BIT_CHOICES key (key and value drawn independently) or one of ALL_BITS
    values: str = "normal"  # how K/V are drawn, see _values
    dtype: torch.dtype = torch.bfloat16
    num_pages: int = 2


# Layout cases at SmolLM2's page shape; value cases on small pages (2 heads x 16 tokens x 2 pages).
SMALL = {"block_size": 16, "num_kv_heads": 2}
CASES = [
    Case("smollm2_mixed"),
    Case("smollm2_low_bits", bits="low", dtype=torch.float16),
    Case("all_2_bit", bits="2"),
    Case("all_3_bit_fp16", bits="3", dtype=torch.float16),
    Case("all_4_bit", bits="4", **SMALL),
    Case("all_8_bit", bits="8", **SMALL),
    Case("all_16_bit", bits="16"),
    Case("one_token_block", block_size=1, num_kv_heads=2),
    # 3-bit codes of 80 elements are 30 bytes; 5 groups padded to 8; Hadamard blocks of 16
    Case("odd_block_head_80", block_size=17, num_kv_heads=2, head_size=80, group_size=16),
    # Hadamard block 32: rotate is not orthonormal; 3 groups padded to 4
    Case("head_96_padded_groups", block_size=5, num_kv_heads=1, head_size=96, group_size=32),
    Case("head_128_group_64", block_size=8, num_kv_heads=4, head_size=128, group_size=64),
    Case("constant_rows", values="constant", **SMALL),
    Case("threshold_ties", values="ties", dtype=torch.float16, **SMALL),
    Case("fp16_subnormal_scales", values="small", **SMALL),
    Case("tiny_subnormal", values="tiny", **SMALL),
    Case("near_max_rotated_abs", values="huge", bits="low", **SMALL),
    Case("clamped_outliers", values="outliers", **SMALL),
    Case("beyond_range_at_16_bits", values="beyond", **SMALL),
]
# every supported head size with every group size that divides it, mixed bits, dtypes alternating
SWEEP = [
    Case(
        f"sweep_h{d}_g{g}",
        block_size=16,
        num_kv_heads=2,
        head_size=d,
        group_size=g,
        dtype=(torch.bfloat16, torch.float16)[i % 2],
        num_pages=2,
    )  # fmt: skip
    for i, (d, g) in enumerate((d, g) for d in range(32, 257, 16) for g in (16, 32, 64, 128) if d % g == 0)
]


def _values(case: Case, gen: torch.Generator) -> torch.Tensor:
    """[2, n, block_size, H, D] keys and values, exact in case.dtype."""
    shape = (2, case.num_pages, case.block_size, case.num_kv_heads, case.head_size)
    x = torch.randn(shape, generator=gen)
    if case.values == "constant":  # rotated, a constant row is one spike per Hadamard block, zeros
        x = x[..., :1].expand(shape) / 3  # elsewhere: all-zero groups (scale 0, zero code)
    elif case.values == "ties":
        x = _on_thresholds(shape, case.group_size, gen)
    elif case.values == "small":  # scales a few fp16 subnormal steps: clip factors share one scale
        x = x * 1e-7
    elif case.values == "tiny":  # bf16 subnormals: every scale underflows to 0
        x = x * 1e-38
    elif case.values == "huge":  # rotated values up to near MAX_ROTATED_ABS: scales near fp16's top
        x = x.clamp(-1, 1)
        x = x * (0.98 * MAX_ROTATED_ABS / rotate(x).abs().amax())
    elif case.values == "outliers":  # one entry per row beyond MAX_QUANTIZED_ABS: clamped first
        spike = torch.randint(0, case.head_size, shape[:-1], generator=gen)
        x.scatter_(-1, spike.unsqueeze(-1), 1e5)
    elif case.values == "beyond":  # token 0 would overflow a quantized record: _bits stores it at 16
        x[:, :, 0] = 30000.0
    x = x.to(case.dtype)
    if case.values == "huge":  # no clamping, and every record quantizable
        assert x.abs().max() <= MAX_QUANTIZED_ABS and rotate(x.float()).abs().max() <= MAX_ROTATED_ABS
    return x


def _on_thresholds(shape, group_size: int, gen: torch.Generator) -> torch.Tensor:
    """Rows whose rotation is exact and sparse: in the first group of each Hadamard block (groups
    never straddle blocks), 255 * 2**(e-6) (the 8-bit top level times 2**e, so the unclipped 8-bit
    scale is exactly 2**e) and j/32 * 2**e (exactly on an 8-bit threshold); zeros elsewhere (exactly
    on every codebook's 0 threshold). Their inverse rotation is exact in fp16."""
    d = shape[-1]
    y = torch.zeros(shape)
    e = torch.randint(-4, 4, shape[:-1], generator=gen).float()
    for start in range(0, d, hadamard_block(d)):
        y[..., start] = 255 * 2.0 ** (e - 6)
        j = torch.randint(-127, 128, shape[:-1], generator=gen).float()
        y[..., start + 1 + int(torch.randint(0, group_size - 1, (1,), generator=gen))] = j / 32 * 2.0**e
    x = unrotate(y)
    assert torch.equal(rotate(x.half().float()), y), "the construction must survive fp16"
    return x


def _bits(case: Case, gen: torch.Generator):
    shape = (case.num_pages, case.block_size)
    if case.bits not in BIT_CHOICES:
        return torch.full(shape, int(case.bits)), torch.full(shape, int(case.bits))
    choices = torch.tensor(BIT_CHOICES[case.bits])
    kb = choices[torch.randint(0, choices.numel(), shape, generator=gen)]
    vb = choices[torch.randint(0, choices.numel(), shape, generator=gen)]
    if case.values == "beyond":
        kb[:, 0] = vb[:, 0] = 16
    return kb, vb


def _codec(case: Case) -> PageCodec:
    bs, h = case.block_size, case.num_kv_heads
    record = fmt.RecordLayout(case.head_size, case.group_size)
    layout = fmt.PageLayout(bs, h, record, fmt.page_bytes_for_target(bs, h, record, 16, 16))
    return PageCodec(layout, case.dtype)


def _seal():
    return importlib.import_module("adakv_vllm.kernels.triton_seal").seal_pages


def _check(case: Case) -> None:
    gen = torch.Generator().manual_seed(len(case.name))
    key, value = _values(case, gen)
    key_bits, value_bits = _bits(case, gen)
    codec = _codec(case)
    expected = codec.encode(key, value, key_bits, value_bits)
    pages = _seal()(codec, key.to(DEVICE), value.to(DEVICE), key_bits.to(DEVICE), value_bits.to(DEVICE))
    _assert_same_pages(pages.cpu(), expected)


def _assert_same_pages(pages: torch.Tensor, expected: torch.Tensor) -> None:
    """Byte-equal, or a message naming the first differing bytes."""
    differ = (pages != expected).nonzero()
    first = differ[:8].tolist()
    assert differ.numel() == 0, f"{differ.shape[0]} bytes differ from PageCodec.encode; [page, byte]: {first}"


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_pages_equal_the_codec(case):
    _check(case)


@needs_kernel
@pytest.mark.slow
@pytest.mark.parametrize("case", SWEEP, ids=lambda c: c.name)
def test_pages_equal_the_codec_sweep(case):
    _check(case)


@needs_kernel
def test_in_place_rows_of_a_pool():
    """Shuffled destination rows of a strided pool full of garbage: exactly those rows become the
    codec's pages (slack zeroed), every other byte is untouched."""
    case = Case("pool", num_pages=4, **SMALL)
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
    _assert_same_pages(pool[rows, :page_bytes], codec.encode(key, value, key_bits, value_bits))
    untouched = torch.ones(9, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(pool[untouched], before[untouched])
    assert torch.equal(pool[:, page_bytes:], before[:, page_bytes:])


def test_invalid_inputs_raise_value_error():
    case = Case("v", num_pages=1)
    codec = _codec(case)
    key, value = _values(case, torch.Generator().manual_seed(0))
    bits = torch.full((1, 32), 4)
    seal = _seal()
    with pytest.raises(ValueError, match="bits must be in"):
        seal(codec, key, value, torch.full((1, 32), 5), bits)
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
    long_row = value.clone()
    long_row[0, 3, 1] = 30000.0  # rotated: 8 * 30000 in channel 0
    with pytest.raises(ValueError, match="store them at 16 bits"):
        seal(codec, key, long_row, bits, bits)


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
