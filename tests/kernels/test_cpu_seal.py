"""The compiled page encoder (kernels/csrc/cpu_seal.cpp) against its oracle PageCodec.encode
(itself tested against quant.reference.pack_page): the same bytes (torch.equal), the same errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adakv_vllm.blocks.store import KVStore
from adakv_vllm.kernels import cpu, library
from adakv_vllm.kernels.page_codec import PageCodec
from adakv_vllm.quant import format as fmt
from adakv_vllm.quant import levels, reference
from adakv_vllm.quant.precision import ALL_BITS
from adakv_vllm.quant.reference import MAX_QUANTIZED_ABS
from adakv_vllm.quant.rotation import rotate, unrotate


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    block_size: int = 32
    num_kv_heads: int = 3
    head_size: int = 64
    group_size: int = 32
    target: float = 4.0  # page budget, average bits
    bits: str = (
        "mixed"  # "mixed" (2/3/4/8/16, key and value independent, fitting the page) or one of ALL_BITS
    )


CASES = [
    Case("smollm2"),
    Case("all_2_bit", target=2, bits="2"),
    Case("all_3_bit", target=3, bits="3"),
    Case("all_4_bit", bits="4"),
    Case("all_8_bit", target=8, bits="8"),
    Case("all_16_bit", target=16, bits="16"),
    Case("one_kv_head_group_16", block_size=16, num_kv_heads=1, group_size=16, target=3),
    Case("odd_block_head_80", block_size=17, num_kv_heads=2, head_size=80, group_size=16, target=8),
    Case("head_32_group_16", block_size=16, head_size=32, group_size=16, target=5),
    Case("head_48_three_blocks_of_16", block_size=9, num_kv_heads=2, head_size=48, group_size=16, target=6),
    Case("head_96_group_32", block_size=16, num_kv_heads=2, head_size=96, group_size=32, target=3.5),
    Case("head_128_group_64", block_size=16, num_kv_heads=4, head_size=128, group_size=64, target=2.5),
    Case("head_128_group_32", block_size=32, num_kv_heads=2, head_size=128, group_size=32, target=5),
    Case("head_256_group_128", block_size=8, num_kv_heads=2, head_size=256, group_size=128, target=4),
    Case("head_64_group_64", block_size=16, head_size=64, group_size=64, target=6),
]


@pytest.fixture(scope="module")
def module():
    return library.build()


def _layout(case: Case) -> fmt.PageLayout:
    record = fmt.RecordLayout(case.head_size, case.group_size)
    page_bytes = fmt.page_bytes_for_target(
        case.block_size, case.num_kv_heads, record, case.target, case.target
    )
    return fmt.PageLayout(case.block_size, case.num_kv_heads, record, page_bytes)


def _bits(case: Case, layout: fmt.PageLayout, n: int, gen: torch.Generator):
    """[n, block_size] key and value bits that fit the page: sample, then lower tokens until they fit."""
    t = layout.block_size
    if case.bits != "mixed":
        b = torch.full((n, t), int(case.bits))
        return b, b.clone()
    choices = torch.tensor(ALL_BITS)
    kb = choices[torch.randint(0, len(ALL_BITS), (n, t), generator=gen)]
    vb = choices[torch.randint(0, len(ALL_BITS), (n, t), generator=gen)]
    for i in range(n):
        pos = 0
        while not layout.fits(kb[i], vb[i]):
            part = kb if pos // t % 2 == 0 else vb
            part[i, pos % t] = 2
            pos += 1
    return kb, vb


def _kv(n: int, layout: fmt.PageLayout, dtype: torch.dtype, gen: torch.Generator):
    """[n, block_size, H, D] keys (with outlier channels, as real keys have) and values."""
    shape = (n, layout.block_size, layout.num_kv_heads, layout.record.head_size)
    key = torch.randn(*shape, generator=gen) * torch.linspace(0.1, 8, shape[-1])
    return key.to(dtype), torch.randn(*shape, generator=gen).to(dtype)


def _rotated_ties(head_size: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (x, y) with rotate(x) == y exactly (x exact in fp16): y's first group holds a spike at the
    8-bit grid's top level and values exactly on its thresholds (j/32 in units of the scale, 1), so
    at 8 bits x / scale lands on thresholds; the strict < of the oracle decides those codes."""
    y = torch.zeros(head_size)
    y[0] = levels.LEVELS[8][-1]  # absmax / top level == 1: the scale is exactly 1
    j = torch.arange(1, 6)
    y[j] = levels.THRESHOLDS[8][127 + j]  # j / 32: a short mantissa, so x stays exact
    y[group_size - 1] = -levels.THRESHOLDS[8][127 + 3]
    return unrotate(y), y


def _adversarial(key: torch.Tensor, value: torch.Tensor, group: int) -> None:
    """Write the quantizer's edge cases into the first pages, in place (both tensors [n, T, H, D])."""
    d = key.shape[-1]
    key[0, 0] = 1.5  # a constant row rotates to one spike per Hadamard block: zero groups beside it
    key[0, 1] = 0.0  # an all-zero record: scale 0 and the zero code everywhere
    value[0, 1, :, :group] = 0.0  # a zero input group beside random ones
    value[0, 2, :, :2] = MAX_QUANTIZED_ABS  # the quantizer's clamp, both signs (4 channels of it rotate
    value[0, 2, :, 2:4] = -MAX_QUANTIZED_ABS  # to at most 32768 in a Hadamard block of 16)
    key[0, 2, :, :4] = 40000.0  # clamped to MAX_QUANTIZED_ABS first (16-bit records keep it)
    value[0, 3] = 0.0
    value[0, 3, :, 0] = 2.0**-24  # rotated absmax so small that every candidate scale rounds to 0
    value[0, 4] = 0.0
    value[0, 4, :, 0] = 2.0**-21  # the larger candidate scales are subnormal fp16, the smaller ones 0
    key[0, 3] = 0.0
    key[0, 3, :, :2] = 1.0  # rotated: 2 +- 2**-70 beside +-2**-70 where the ones cancel, so y / scale
    key[0, 3, :, 2] = 2.0**-70  # can underflow (bf16 only; fp16 flushes it to 0)
    key[0, 5] = 2.0**-20 * torch.arange(d)  # tiny ranges: subnormal fp16 scales
    value[0, 5] = 0.0
    value[0, 5, :, 0] = 2.0**-18  # several candidate scales round to one subnormal fp16: exact ties
    key[0, 6] = _rotated_ties(d, group)[0]
    value[0, 6] = -_rotated_ties(d, group)[0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pages_equal_the_codec(module, case, dtype):
    layout = _layout(case)
    gen = torch.Generator().manual_seed(CASES.index(case))
    n = 5
    key, value = _kv(n, layout, dtype, gen)
    if layout.block_size >= 7:
        _adversarial(key, value, case.group_size)
    kb, vb = _bits(case, layout, n, gen)
    codec = PageCodec(layout, dtype)
    expected = codec.encode(key, value, kb, vb)
    pages = cpu.encode_pages(key, value, kb, vb, layout, dtype, module)
    assert torch.equal(pages, expected)
    k1, v1, kb1, vb1 = codec.decode(pages)  # and so decode(encode) round-trips as the codec's
    k0, v0, _, _ = codec.decode(expected)
    assert torch.equal(k1, k0) and torch.equal(v1, v0)
    assert torch.equal(kb1, kb) and torch.equal(vb1, vb)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("data", ["gaussian", "heavy_tailed", "coarse_grid", "spikes"])
def test_clip_search_picks_the_codecs_scale_over_many_records(module, bits, data):
    """The clip search's fp32 pass (codes of |y| in the codebook's positive half, y times 1 / s,
    candidates pruned by the clipped elements' error) decides as the codec's fp64 errors do, over
    8192 groups per case: Gaussian; heavy-tailed (one large element per group: the clipping
    candidates differ most); on a coarse grid (few distinct values, so candidates' errors tie exactly
    or nearly and the exact pass decides); spikes (groups of two or three magnitudes, where the
    clipped elements' error is most of a candidate's)."""
    case = Case(
        "many", block_size=32, num_kv_heads=2, head_size=64, group_size=32, target=bits, bits=str(bits)
    )
    layout = _layout(case)
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 32, 32, 2, 64, generator=gen)
    if data == "heavy_tailed":
        x = x**3
    elif data == "coarse_grid":
        x = torch.round(x * 2) / 2
    elif data == "spikes":  # a few large channels rotate to groups of two or three magnitudes
        spikes = torch.rand(x.shape, generator=gen) < 0.03
        x = 0.2 * x + spikes * 8 * torch.randn(x.shape, generator=gen)
    key, value = x.bfloat16()
    kb = torch.full((32, 32), bits)
    expected = PageCodec(layout, torch.bfloat16).encode(key, value, kb, kb)
    assert torch.equal(cpu.encode_pages(key, value, kb, kb, layout, torch.bfloat16, module), expected)


@pytest.mark.parametrize("head_size", [32, 48, 64, 80, 128, 256])
def test_threshold_ties_are_real_and_coded_as_the_codec(module, head_size):
    """The ties _adversarial relies on: exact in fp16, rotated exactly onto the 8-bit thresholds."""
    x, y = _rotated_ties(head_size, 16)
    assert torch.equal(x.half().float(), x) and torch.equal(rotate(x.half()), y)
    layout = _layout(Case("ties", block_size=1, num_kv_heads=1, head_size=head_size, group_size=16, target=8))
    kv = x.half().reshape(1, 1, 1, head_size)
    bits = torch.full((1, 1), 8)
    expected = PageCodec(layout, torch.float16).encode(kv, -kv, bits, bits)
    assert torch.equal(cpu.encode_pages(kv, -kv, bits, bits, layout, torch.float16, module), expected)


@pytest.mark.parametrize("num_tokens", [1, 7])
def test_partial_blocks(module, num_tokens):
    """Fewer tokens than block_size, as the codec allows: bit map bytes past them stay zero."""
    layout = _layout(Case("partial", block_size=16, target=16))
    gen = torch.Generator().manual_seed(num_tokens)
    key, value = (x[:, :num_tokens] for x in _kv(3, layout, torch.bfloat16, gen))
    kb, vb = (b[:, :num_tokens] for b in _bits(Case("partial"), layout, 3, gen))
    expected = PageCodec(layout, torch.bfloat16).encode(key, value, kb, vb)
    assert torch.equal(cpu.encode_pages(key, value, kb, vb, layout, torch.bfloat16, module), expected)


def test_single_record_classes_equal_the_oracle(module):
    """A precision class of one record, head_size 128: the rotation is the oracle's butterflies, so a
    row rounds alike alone or in a batch (a GEMM would not promise that)."""
    layout = _layout(Case("small_classes", block_size=16, num_kv_heads=1, head_size=128, target=16))
    gen = torch.Generator().manual_seed(0)
    key, value = _kv(2, layout, torch.float16, gen)
    kb = torch.full((2, 16), 16)
    kb[0, 3], kb[1, 5], kb[1, 9], kb[1, 12], kb[1, 13] = 2, 4, 8, 8, 3
    pages = cpu.encode_pages(key, value, kb, kb, layout, torch.float16, module)
    for i in range(2):
        assert torch.equal(pages[i], reference.pack_page(layout, key[i], value[i], kb[i], kb[i]))


def test_in_place_reads_slots_and_writes_strided_rows(module):
    """KVStore.seal's form: pages read from shuffled staging slots, clamped, written into shuffled
    rows of a tensor whose rows are strided; other rows and the row padding stay untouched."""
    case = Case("in_place", target=8)
    layout = _layout(case)
    gen = torch.Generator().manual_seed(3)
    staging_key, staging_value = _kv(9, layout, torch.bfloat16, gen)
    staging_key[2, 0, 0, :3] = torch.tensor([1e5, float("inf"), -float("inf")])  # clamped away
    staging_value[4, 1, 1, 5] = -3e6
    slots = torch.tensor([4, 2, 7, 0])
    kb, vb = _bits(case, layout, 4, gen)
    kb[0, 1] = 16  # a clamped value in a 16-bit record
    assert layout.fits(kb[0], vb[0])
    rows = torch.tensor([5, 1, 9, 2])
    storage = torch.randint(0, 256, (12, layout.page_bytes + 48), dtype=torch.uint8, generator=gen)
    out = storage[:, : layout.page_bytes]  # stride(0) = page_bytes + 48
    before = storage.clone()
    clamp = MAX_QUANTIZED_ABS
    cpu.encode_pages(
        staging_key, staging_value, kb, vb, layout, torch.bfloat16, module,
        slots=slots, clamp=clamp, out=out, block_ids=rows,
    )  # fmt: skip
    expected = PageCodec(layout, torch.bfloat16).encode(
        staging_key[slots].clamp(-clamp, clamp), staging_value[slots].clamp(-clamp, clamp), kb, vb
    )
    assert torch.equal(out[rows], expected)
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(storage[untouched], before[untouched])
    assert torch.equal(storage[:, layout.page_bytes :], before[:, layout.page_bytes :])


def test_budget_and_bits_errors_write_nothing(module):
    layout = _layout(Case("budget", target=4))
    kv = torch.zeros(2, 32, 3, 64, dtype=torch.bfloat16)
    out = torch.full((4, layout.page_bytes), 7, dtype=torch.uint8)
    rows = torch.tensor([1, 3])
    over = torch.full((2, 32), 8)
    with pytest.raises(ValueError, match="bits exceed the page budget"):
        PageCodec(layout, torch.bfloat16).encode(kv, kv, over, over)
    with pytest.raises(ValueError, match="bits exceed the page budget"):
        cpu.encode_pages(kv, kv, over, over, layout, torch.bfloat16, module, out=out, block_ids=rows)
    odd = torch.full((2, 32), 2)
    odd[1, 4] = 5
    with pytest.raises(ValueError, match="bits must be in"):
        cpu.encode_pages(kv, kv, odd, odd, layout, torch.bfloat16, module, out=out, block_ids=rows)
    fits = torch.full((2, 32), 2)
    bad_rows = [(torch.tensor([0, 2]), rows), (None, torch.tensor([3, 3])), (None, torch.tensor([0, 4]))]
    for slots, block_ids in bad_rows:  # slot 2 of 2, a repeated row, row 4 of 4
        with pytest.raises(ValueError, match="slots must be rows"):
            cpu.encode_pages(
                kv, kv, fits, fits, layout, torch.bfloat16, module, slots=slots, out=out, block_ids=block_ids
            )
    assert (out == 7).all()


def test_value_errors_as_the_codec(module):
    layout = _layout(Case("values", target=16))
    kv = torch.ones(1, 32, 3, 64, dtype=torch.bfloat16)
    bits = torch.full((1, 32), 4)
    # a NaN or inf anywhere; a row whose clamped values rotate beyond the fp16 scale's range
    with_nan, with_inf = torch.ones(64), torch.ones(64)
    with_nan[7], with_inf[7] = float("nan"), float("inf")
    long_row = torch.full((64,), 1e5)
    for row, match in ((with_nan, "NaN or inf"), (with_inf, "NaN or inf"), (long_row, "16 bits")):
        x = kv.clone()
        x[0, 3, 1] = row
        for encode in (
            lambda x=x: PageCodec(layout, torch.bfloat16).encode(x, kv, bits, bits),
            lambda x=x: cpu.encode_pages(x, kv, bits, bits, layout, torch.bfloat16, module),
        ):
            with pytest.raises(ValueError, match=match):
                encode()
    # beyond MAX_QUANTIZED_ABS in one channel is clamped, not an error (its rotation stays in range)
    x = kv.clone()
    x[0, 3, 1, 7] = 4e4
    expected = PageCodec(layout, torch.bfloat16).encode(x, kv, bits, bits)
    assert torch.equal(cpu.encode_pages(x, kv, bits, bits, layout, torch.bfloat16, module), expected)
    # 16-bit records accept any finite value, and clamp turns inf into the bound (torch.clamp)
    x = kv.clone()
    x[0, 3, 1, 7] = float("inf")
    wide = torch.full((1, 32), 16)
    with pytest.raises(ValueError, match="NaN or inf"):
        cpu.encode_pages(x, kv, wide, wide, layout, torch.bfloat16, module)
    pages = cpu.encode_pages(x, kv, wide, wide, layout, torch.bfloat16, module, clamp=MAX_QUANTIZED_ABS)
    expected = PageCodec(layout, torch.bfloat16).encode(
        x.clamp(-MAX_QUANTIZED_ABS, MAX_QUANTIZED_ABS), kv, wide, wide
    )
    assert torch.equal(pages, expected)


def test_bad_arguments_raise(module):
    layout = _layout(Case("args"))
    kv = torch.zeros(2, 32, 3, 64, dtype=torch.bfloat16)
    bits = torch.full((2, 32), 2)
    with pytest.raises(ValueError, match="storage_dtype"):
        cpu.encode_pages(kv.half(), kv.half(), bits, bits, layout, torch.bfloat16, module)
    with pytest.raises(ValueError, match="key/value must be"):
        cpu.encode_pages(kv[..., :32], kv[..., :32], bits, bits, layout, torch.bfloat16, module)
    with pytest.raises(ValueError, match="num_tokens"):
        cpu.encode_pages(kv, kv, bits[:, :0], bits[:, :0], layout, torch.bfloat16, module)
    with pytest.raises(ValueError, match="out must be"):
        out = torch.zeros(2, layout.page_bytes - 1, dtype=torch.uint8)
        cpu.encode_pages(kv, kv, bits, bits, layout, torch.bfloat16, module, out=out, block_ids=bits[:, 0])
    with pytest.raises(ValueError, match="clamp must be exactly representable"):
        cpu.encode_pages(kv, kv, bits, bits, layout, torch.bfloat16, module, clamp=1000.5)


def _asymmetric(book) -> None:
    book.levels[15] *= 1.5


def _levels_too_close(book) -> None:
    """Levels 8 and 9 (and their mirrors) 0.001 apart: the threshold between them is ~130 gaps from 0."""
    book.levels[9] = book.levels[8] + 0.001
    book.levels[6] = -book.levels[9]
    book.thresholds[8] = (book.levels[8] + book.levels[9]) / 2
    book.thresholds[6] = -book.thresholds[8]


@pytest.mark.parametrize("edit", [_asymmetric, _levels_too_close], ids=lambda f: f.__name__.strip("_"))
def test_codebooks_the_clip_search_cannot_read_are_refused(module, monkeypatch, edit):
    """The clip search's fp32 pass assumes a symmetric codebook whose positive thresholds sit within
    16 level gaps of zero (cpu_quant.h: symmetric_search_ok): another 4-bit table is refused before
    anything is written, not searched wrongly."""
    layout = _layout(Case("codebook", target=4, bits="4"))
    kv = torch.randn(1, 32, 3, 64).bfloat16()
    bits = torch.full((1, 32), 4)
    books = cpu.Codebooks.from_buffer_copy(cpu.codebooks())
    edit(books.code[2])  # precision code 2: 4 bits
    monkeypatch.setattr(cpu, "codebooks", lambda: books)
    out = torch.full((1, layout.page_bytes), 7, dtype=torch.uint8)
    with pytest.raises(ValueError, match="inconsistent arguments"):
        cpu.encode_pages(kv, kv, bits, bits, layout, torch.bfloat16, module, out=out, block_ids=bits[:, 0])
    assert (out == 7).all()


def test_threads_do_not_change_the_bytes(module):
    case = Case("threads", block_size=16)
    layout = _layout(case)
    gen = torch.Generator().manual_seed(11)
    key, value = _kv(7, layout, torch.bfloat16, gen)
    kb, vb = _bits(case, layout, 7, gen)
    threads = torch.get_num_threads()
    try:
        pages = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            pages.append(cpu.encode_pages(key, value, kb, vb, layout, torch.bfloat16, module))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(pages[0], pages[1]) and torch.equal(pages[0], pages[2])


def _sealed_store(seed: int = 0) -> KVStore:
    """A 3-layer store with rows strided like vLLM's, 6 blocks written (outliers beyond the
    quantizable range included) and 5 of them sealed at mixed bits, in a shuffled order."""
    case = Case("store", block_size=16)
    layout = _layout(case)
    num_layers, num_blocks = 3, 10
    store = KVStore(layout, num_layers, num_blocks, torch.bfloat16, max_staging_slots=8)
    for layer in range(num_layers):
        store.bind(
            layer, torch.zeros(num_blocks, layout.page_bytes + 32, dtype=torch.uint8)[:, : layout.page_bytes]
        )
    gen = torch.Generator().manual_seed(seed)
    blocks = [7, 2, 9, 0, 4, 5]
    slots = torch.tensor([b * 16 + i for b in blocks for i in range(16)])
    store.begin_step()
    for layer in range(num_layers):
        key = torch.randn(len(slots), 3, 64, generator=gen) * 4
        key[5, 1, 3] = 1e6  # clamped to the quantizable range before sealing
        store.write(layer, slots, key.bfloat16(), torch.randn(len(slots), 3, 64, generator=gen).bfloat16())
    kb, vb = _bits(case, layout, 5, gen)
    assert store.seal(torch.tensor(blocks[:5]), kb, vb) == []
    return store


def test_store_seal_with_the_kernel_equals_the_torch_codec(monkeypatch):
    assert library.load() is not None
    compiled = _sealed_store()
    monkeypatch.setattr(library, "load", lambda: None)  # no compiler here: the torch codec
    fallback = _sealed_store()
    for layer in range(3):
        assert torch.equal(compiled.pages[layer], fallback.pages[layer])
    assert torch.equal(compiled.sealed, fallback.sealed)
