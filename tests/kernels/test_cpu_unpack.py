"""The compiled page decoder (kernels/csrc/cpu_unpack.cpp) against its oracle PageCodec.decode,
converted to the storage dtype as KVStore.gather does: the same bits (torch.equal), on both paths
(AVX-512 and the portable one, force_scalar), and the store's gather with and without the library."""

from __future__ import annotations

import pytest
import torch

from adakv_vllm.kernels import cpu, library
from adakv_vllm.kernels.page_codec import PageCodec
from tests.kernels import test_cpu_seal as seal_tests
from tests.kernels.test_cpu_seal import CASES, Case

PATHS = ["native", "scalar"]
DTYPES = [torch.bfloat16, torch.float16]
# storage rows wider than a page, as vLLM's KV tensor is for this layer: strided page rows
ROW_PADDING = 48


@pytest.fixture(scope="module")
def module():
    return library.build()


def _strided_pages(case: Case, dtype: torch.dtype, num_pages: int, seed: int):
    """-> (storage rows [num_pages + 3, page_bytes + ROW_PADDING] uint8 holding num_pages encoded pages
    at shuffled rows among random bytes, their rows [num_pages], the codec)."""
    layout = seal_tests._layout(case)
    gen = torch.Generator().manual_seed(seed)
    key, value = seal_tests._kv(num_pages, layout, dtype, gen)
    if layout.block_size >= 7:
        seal_tests._adversarial(key, value, case.group_size)
    kb, vb = seal_tests._bits(case, layout, num_pages, gen)
    codec = PageCodec(layout, dtype)
    storage = torch.randint(
        0, 256, (num_pages + 3, layout.page_bytes + ROW_PADDING), dtype=torch.uint8, generator=gen
    )
    rows = torch.randperm(num_pages + 3, generator=gen)[:num_pages]
    storage[rows, : layout.page_bytes] = codec.encode(key, value, kb, vb)
    return storage, rows, codec


def _expected(codec: PageCodec, pages: torch.Tensor, block_ids: torch.Tensor):
    key, value, _, _ = codec.decode(pages[block_ids].contiguous())
    return key.to(codec.storage_dtype), value.to(codec.storage_dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_decode_equals_the_codec(module, case, dtype, path):
    """Every precision mix, head size (32..256) and group size, odd block sizes; pages read from
    strided rows in a shuffled order, one of them twice."""
    storage, rows, codec = _strided_pages(case, dtype, 5, seed=CASES.index(case))
    pages = storage[:, : codec.layout.page_bytes]
    block_ids = torch.cat([rows[torch.randperm(5, generator=torch.Generator().manual_seed(1))], rows[2:3]])
    key, value = cpu.decode_pages(
        pages, block_ids, codec.layout, dtype, module, force_scalar=path == "scalar"
    )
    expected_key, expected_value = _expected(codec, pages, block_ids)
    assert torch.equal(key, expected_key) and torch.equal(value, expected_value)


@pytest.mark.parametrize("path", PATHS)
def test_writes_only_the_rows_it_is_given(module, path):
    """KVStore.gather's form: pages into chosen rows of existing tensors; other rows untouched."""
    case = Case("rows", block_size=16, num_kv_heads=2, head_size=96)
    storage, rows, codec = _strided_pages(case, torch.bfloat16, 4, seed=7)
    pages = storage[:, : codec.layout.page_bytes]
    shape = (7, 16, 2, 96)
    out_key = torch.full(shape, 3.0, dtype=torch.bfloat16)
    out_value = torch.full(shape, -3.0, dtype=torch.bfloat16)
    out_rows = torch.tensor([5, 0, 3, 6])
    cpu.decode_pages(
        pages, rows, codec.layout, torch.bfloat16, module,
        out_key=out_key, out_value=out_value, out_rows=out_rows, force_scalar=path == "scalar",
    )  # fmt: skip
    expected_key, expected_value = _expected(codec, pages, rows)
    assert torch.equal(out_key[out_rows], expected_key) and torch.equal(out_value[out_rows], expected_value)
    untouched = torch.tensor([1, 2, 4])
    assert (out_key[untouched] == 3.0).all() and (out_value[untouched] == -3.0).all()


def test_threads_do_not_change_the_bits(module):
    storage, rows, codec = _strided_pages(Case("threads", block_size=16), torch.float16, 6, seed=11)
    pages = storage[:, : codec.layout.page_bytes]
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(cpu.decode_pages(pages, rows, codec.layout, torch.float16, module))
    finally:
        torch.set_num_threads(threads)
    for key, value in outs[1:]:
        assert torch.equal(key, outs[0][0]) and torch.equal(value, outs[0][1])


def test_no_pages(module):
    layout = seal_tests._layout(Case("empty"))
    pages = torch.zeros(2, layout.page_bytes, dtype=torch.uint8)
    key, value = cpu.decode_pages(pages, torch.zeros(0, dtype=torch.int64), layout, torch.bfloat16, module)
    assert key.shape == value.shape == (0, 32, 3, 64)


def test_bad_arguments_raise(module):
    layout = seal_tests._layout(Case("args"))
    pages = torch.zeros(4, layout.page_bytes, dtype=torch.uint8)  # all-2-bit bit maps: valid pages
    ids = torch.tensor([2, 0])
    out = torch.zeros(3, 32, 3, 64, dtype=torch.bfloat16)
    bf16 = torch.bfloat16

    def decode(pages=pages, block_ids=ids, dtype=bf16, **kw):
        return cpu.decode_pages(pages, block_ids, layout, dtype, module, **kw)

    with pytest.raises(ValueError, match="storage_dtype"):
        decode(dtype=torch.float32)
    with pytest.raises(ValueError, match="pages must be"):
        decode(pages=pages[:, :-1])
    with pytest.raises(ValueError, match="pages must be"):
        decode(pages=pages.view(torch.int8))
    with pytest.raises(ValueError, match="contiguous rows"):
        decode(pages=torch.zeros(layout.page_bytes, 4, dtype=torch.uint8).t())
    with pytest.raises(ValueError, match="block_ids must be"):
        decode(block_ids=ids.float())
    with pytest.raises(ValueError, match="block_ids must be rows"):
        decode(block_ids=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="block_ids must be rows"):
        decode(block_ids=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="together"):
        decode(out_key=out)
    with pytest.raises(ValueError, match="pass them too"):
        decode(out_rows=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one row per page"):
        decode(out_key=out, out_value=out.clone())
    with pytest.raises(ValueError, match="out_value must be"):
        decode(out_key=out, out_value=out.half(), out_rows=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="out_key must be"):
        decode(out_key=out[..., :32], out_value=out[..., :32], out_rows=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="contiguous"):
        strided = torch.zeros(32, 3, 3, 64, dtype=bf16).transpose(0, 1)
        decode(out_key=strided, out_value=strided, out_rows=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="out_rows must be"):
        decode(out_key=out, out_value=out.clone(), out_rows=torch.tensor([0]))
    for out_rows in (
        torch.tensor([1, 1]),
        torch.tensor([0, 3]),
        torch.tensor([-1, 0]),
    ):  # the kernel's checks
        out_key, out_value = out.clone().fill_(5), out.clone().fill_(5)
        with pytest.raises(ValueError, match="distinct rows"):
            decode(out_key=out_key, out_value=out_value, out_rows=out_rows)
        assert (out_key == 5).all() and (out_value == 5).all()


def test_a_corrupt_bit_map_is_an_error_before_anything_is_written(module):
    storage, rows, codec = _strided_pages(Case("corrupt", block_size=16), torch.bfloat16, 3, seed=2)
    pages = storage[:, : codec.layout.page_bytes]
    out_key = torch.full((3, 16, 3, 64), 5.0, dtype=torch.bfloat16)
    out_value = out_key.clone()
    for byte in (0x5F, 0xF0):  # value code 5, key code 15: no precision
        broken = pages.clone()
        broken[rows[2], 3] = byte
        with pytest.raises(RuntimeError, match="bit map"):
            cpu.decode_pages(
                broken, rows, codec.layout, torch.bfloat16, module, out_key=out_key, out_value=out_value
            )
    over = pages.clone()
    over[rows[1], :16] = 0x44  # every record 16-bit: more than the 4-bit page holds
    with pytest.raises(RuntimeError, match="bit map"):
        cpu.decode_pages(
            over, rows, codec.layout, torch.bfloat16, module, out_key=out_key, out_value=out_value
        )
    assert (out_key == 5).all() and (out_value == 5).all()


def test_store_gather_with_the_kernel_equals_the_torch_codec(monkeypatch):
    """Sealed blocks (strided page rows, mixed bits) and an open one, in a shuffled order."""
    assert library.load() is not None
    store = seal_tests._sealed_store()  # blocks 7, 2, 9, 0, 4 sealed; 5 open
    block_ids = torch.tensor([4, 5, 9, 0, 7, 2])
    compiled = [store.gather(layer, block_ids) for layer in range(store.num_layers)]
    monkeypatch.setattr(library, "load", lambda: None)  # no compiler here: the torch codec
    for layer, (key, value) in enumerate(compiled):
        expected_key, expected_value = store.gather(layer, block_ids)
        assert key.dtype == torch.bfloat16 and key.shape == (6, 16, 3, 64)
        assert torch.equal(key, expected_key) and torch.equal(value, expected_value)
    assert torch.equal(store.gather(1, block_ids[1:2])[0], compiled[1][0][1:2])  # the open block: staging
