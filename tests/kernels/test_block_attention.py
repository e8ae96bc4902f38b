"""block_attention (both shapes) against its per-token oracle."""

from __future__ import annotations

import pytest
import torch

from adakv_vllm.kernels.block_attention import block_attention, block_attention_ref

BS, HKV, H, D = 8, 2, 6, 16


def _case(slots_per_block: dict[int, list[int]], seed: int, num_blocks: int = 12):
    """Blocks (vLLM ids) -> the offsets written this step; staging slots shuffled."""
    gen = torch.Generator().manual_seed(seed)
    slot_of_block = torch.full((num_blocks,), -1, dtype=torch.int64)
    order = torch.randperm(len(slots_per_block), generator=gen)
    for i, block in enumerate(slots_per_block):
        slot_of_block[block] = int(order[i])
    staging_key = torch.randn(len(slots_per_block), BS, HKV, D, generator=gen).bfloat16()
    mapping = [b * BS + o for b, offs in slots_per_block.items() for o in offs]
    mapping.insert(1, -1)  # padding is ignored
    query = torch.randn(len(mapping), H, D, generator=gen)
    return query, staging_key, slot_of_block, torch.tensor(mapping)


CASES = {
    "decode": {3: [5], 7: [0], 1: [7], 9: [2]},  # one query per block, first/last offsets
    "prefill": {2: list(range(BS)), 4: list(range(BS)), 5: [0, 1, 2]},  # whole blocks + a partial
    "chunk_continues": {6: [3, 4, 5, 6, 7], 8: list(range(BS))},  # a block begun in an earlier step
    "mixed": {0: [4], 10: list(range(BS)), 11: [0, 1]},
}


@pytest.mark.parametrize("name", CASES)
def test_matches_the_oracle(name):
    query, key, slot_of_block, mapping = _case(CASES[name], seed=len(name))
    unique, received, seen = block_attention(query, key, slot_of_block, mapping, BS, 0.3)
    expected = block_attention_ref(query, key, slot_of_block, mapping, BS, 0.3)
    assert sorted(unique.tolist()) == sorted(expected)
    for i, slot in enumerate(unique.tolist()):
        torch.testing.assert_close(received[i], expected[slot][0], rtol=1e-5, atol=1e-6)
        assert torch.equal(seen[i], expected[slot][1])
    # each query row hands out one unit of attention per head
    assert received.sum().item() == pytest.approx(H * int((mapping >= 0).sum()), rel=1e-5)


def test_nothing_written():
    unique, received, seen = block_attention(
        torch.zeros(2, H, D), torch.zeros(1, BS, HKV, D), torch.zeros(4, dtype=torch.int64),
        torch.tensor([-1, -1]), BS, 1.0,
    )  # fmt: skip
    assert unique.numel() == 0 and received.shape == (0, BS)


def test_unwritten_staging_never_leaks_into_the_sums():
    """Staging is allocated uninitialised: positions a block has not reached may hold NaN."""
    query, key, slot_of_block, mapping = _case(CASES["prefill"], seed=3)
    key[int(slot_of_block[5]), 3:] = float("nan")  # block 5 holds 3 tokens so far
    unique, received, seen = block_attention(query, key, slot_of_block, mapping, BS, 0.3)
    assert torch.isfinite(received).all() and torch.isfinite(seen).all()
    expected = block_attention_ref(query, key, slot_of_block, mapping, BS, 0.3)
    for i, slot in enumerate(unique.tolist()):
        torch.testing.assert_close(received[i], expected[slot][0], rtol=1e-5, atol=1e-6)


def test_a_slot_without_staging_is_skipped_like_padding():
    query, key, slot_of_block, mapping = _case(CASES["mixed"], seed=4)
    unstaged = torch.tensor([9 * BS + 1])  # block 9 holds no staging slot (-1)
    assert slot_of_block[9] == -1
    query = torch.cat([query, torch.randn(1, H, D)])
    with_it = block_attention(query, key, slot_of_block, torch.cat([mapping, unstaged]), BS, 0.3)
    padded = block_attention(query, key, slot_of_block, torch.cat([mapping, torch.tensor([-1])]), BS, 0.3)
    for a, b in zip(with_it, padded, strict=True):
        assert torch.equal(a, b)
