"""The compiled within-block attention (csrc/cpu_block_attn.cpp) against its oracle, attend."""

from __future__ import annotations

import pytest
import torch

from adakv_vllm.kernels import block_attention as ba
from adakv_vllm.kernels import cpu, library
from tests.kernels.test_block_attention import BS, CASES, HKV, H

D = 64  # the kernel's dot product runs over multiples of 16


@pytest.fixture(scope="module")
def module():
    return library.build()


def _case(name: str, dtype: torch.dtype, seed: int, strided: bool = False):
    gen = torch.Generator().manual_seed(seed)
    blocks = CASES[name]
    slot_of_block = torch.full((12,), -1, dtype=torch.int64)
    for i, block in enumerate(blocks):
        slot_of_block[block] = (i * 5 + 3) % len(blocks)  # staging slots in another order
    key = (torch.randn(len(blocks), BS, HKV, D, generator=gen) * 2).to(dtype)
    mapping = torch.tensor([b * BS + o for b, offs in blocks.items() for o in offs] + [-1])
    width = H * D + (16 if strided else 0)  # strided: each token's row has 16 more elements
    query = (
        (torch.randn(mapping.numel(), width, generator=gen) * 2).to(dtype)[:, : H * D].unflatten(1, (H, D))
    )
    return query, key, slot_of_block, mapping


def _both(query, key, slot_of_block, mapping, module, scale=0.2):
    where = ba.locate(slot_of_block, mapping, BS, H)
    expected = torch.zeros(key.shape[0], BS).index_add_(0, where.unique, ba.attend(query, key, where, scale))
    got = torch.full((key.shape[0], BS), 0.0)
    cpu.block_attention(query, key, where.rows, where.staged, where.offset, scale, got, module)
    return got, expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", CASES)
def test_matches_attend(module, name, dtype):
    got, expected = _both(*_case(name, dtype, seed=len(name)), module)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-4, 3.0, 40.0])
def test_flat_and_peaked_softmax(module, scale):
    """The kernel's exp is a polynomial that flushes e**x below 2**-126 to 0: near-uniform, peaked
    and one-hot attention (scores far apart) all match the oracle's torch.softmax."""
    got, expected = _both(*_case("mixed", torch.float32, seed=3), module, scale=scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_strided_query_rows_and_adds_to_what_is_there(module):
    query, key, slot_of_block, mapping = _case("mixed", torch.bfloat16, seed=9, strided=True)
    assert not query.is_contiguous()
    where = ba.locate(slot_of_block, mapping, BS, H)
    got = torch.ones(key.shape[0], BS)
    cpu.block_attention(query, key, where.rows, where.staged, where.offset, 0.2, got, module)
    expected = torch.ones(key.shape[0], BS).index_add_(0, where.unique, ba.attend(query, key, where, 0.2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_tokens_of_a_block_in_any_order(module):
    """The kernel widens a block's keys once per run of tokens of one slot; tokens of a block that
    come apart, out of position order, between other blocks' tokens, give the same attention."""
    query, key, slot_of_block, mapping = _case("mixed", torch.bfloat16, seed=5)
    where = ba.locate(slot_of_block, mapping, BS, H)
    order = torch.randperm(where.rows.numel(), generator=torch.Generator().manual_seed(0))
    got = torch.zeros(key.shape[0], BS)
    rows, slots, offsets = where.rows[order], where.staged[order], where.offset[order]
    cpu.block_attention(query, key, rows, slots, offsets, 0.2, got, module)
    expected = torch.zeros(key.shape[0], BS).index_add_(0, where.unique, ba.attend(query, key, where, 0.2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_threads_do_not_change_the_result(module):
    case = _case("prefill", torch.bfloat16, seed=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = _both(*case, module)
        torch.set_num_threads(2)
        two, _ = _both(*case, module)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_bad_arguments_raise_and_write_nothing(module):
    query, key, slot_of_block, mapping = _case("decode", torch.bfloat16, seed=1)
    where = ba.locate(slot_of_block, mapping, BS, H)
    received = torch.zeros(key.shape[0], BS)
    for rows, slots, offsets in (
        (where.rows + 100, where.staged, where.offset),  # a query row past the step
        (where.rows, where.staged + 100, where.offset),  # a staging slot past the area
        (where.rows, where.staged, where.offset + BS),  # a position past the block
    ):
        with pytest.raises(ValueError, match="out of range"):
            cpu.block_attention(query, key, rows, slots, offsets, 0.2, received, module)
    assert not received.any()
    with pytest.raises(ValueError, match="one dtype"):
        cpu.block_attention(query.float(), key, where.rows, where.staged, where.offset, 0.2, received, module)
    with pytest.raises(ValueError, match="fp32"):
        cpu.block_attention(
            query, key, where.rows, where.staged, where.offset, 0.2, received.double(), module
        )


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 4), (12, 3), (10, 2)])  # GQA groups 1, 2, 4, 5
def test_every_group_size_matches_attend(module, heads, kv_heads):
    """The kernel scores the query heads of one KV head together for groups of up to 4, head by
    head beyond: each gives the oracle's attention."""
    gen = torch.Generator().manual_seed(heads)
    num_blocks = 3
    key = torch.randn(num_blocks, BS, kv_heads, D, generator=gen).bfloat16()
    slot_of_block = torch.tensor([2, 0, 1])
    mapping = torch.cat([torch.arange(BS), BS + torch.arange(5), 2 * BS + torch.arange(BS // 2, BS)])
    query = torch.randn(mapping.numel(), heads, D, generator=gen).bfloat16()
    where = ba.locate(slot_of_block, mapping, BS, heads)
    expected = torch.zeros(num_blocks, BS).index_add_(0, where.unique, ba.attend(query, key, where, 0.2))
    got = torch.zeros(num_blocks, BS)
    cpu.block_attention(query, key, where.rows, where.staged, where.offset, 0.2, got, module)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
