"""SealBook without an engine: candidates, prior counts, features, freeing, re-allocation."""

from __future__ import annotations

import collections
import math

import pytest
import torch

from adakv_vllm.engine.seal_book import SealBook

BS = 4


def naive_prior(tokens, start):
    seen = collections.Counter(tokens[:start])
    out = []
    for t in tokens[start : start + BS]:
        out.append(seen[t])
        seen[t] += 1
    return out


def test_candidates_are_the_full_unsealed_blocks_with_prefix_counts():
    book = SealBook(BS)
    tokens = [5, 6, 5, 7, 5, 8, 6, 6, 9, 5, 5]  # 2 full blocks + 3 tokens
    found = book.collect("r", [10, 11, 12], num_computed=11, tokens=tokens)
    assert list(found) == [10, 11]
    for i, block in enumerate((10, 11)):
        assert found[block].prior_count == naive_prior(tokens, i * BS)
        assert found[block].token_ids == tokens[i * BS : (i + 1) * BS]
    book.mark_sealed(10, found[10])
    book.mark_sealed(11, found[11])
    assert book.collect("r", [10, 11, 12], num_computed=11, tokens=tokens) == {}
    tokens += [5]
    again = book.collect("r", [10, 11, 12], num_computed=12, tokens=tokens)
    assert list(again) == [12] and again[12].prior_count == naive_prior(tokens, 8)


def test_counts_stay_right_when_a_block_is_collected_again():
    book = SealBook(BS)
    tokens = [1, 2, 1, 2, 1, 2, 1, 2]
    first = book.collect("r", [3, 4], 8, tokens)
    book.forget(3)  # e.g. dropped as a fresh id: collected again next step
    second = book.collect("r", [3, 4], 8, tokens)
    assert first[3].prior_count == second[3].prior_count == naive_prior(tokens, 0)
    assert second[4].prior_count == naive_prior(tokens, 4)


def test_features_reach_the_policy_and_leave_with_the_seal():
    book = SealBook(BS)
    tokens = list(range(8))
    book.store_qerr(torch.tensor([4 * BS + 1]), torch.tensor([[0.5, 0.2, 0.1, 0.01]]))
    book.store_attention({4: [0.1, 0.2, 0.3, 0.4]})
    book.record_sampled("r", [2], [(1.5, 0.25)])
    found = book.collect("r", [4, 5], 8, tokens)
    block = book.block_tokens(4, found[4])
    assert torch.equal(block.qerr[1], torch.tensor([0.5, 0.2, 0.1, 0.01]))
    assert torch.isnan(block.qerr[0]).all()
    assert block.sampled[2].tolist() == [1.5, 0.25] and math.isnan(block.sampled[0, 0])
    assert block.positions.tolist() == [0, 1, 2, 3]
    assert block.attention.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert torch.isnan(book.block_tokens(5, found[5]).attention).all()
    book.mark_sealed(4, found[4])
    sealed = book.block_tokens(4, found[4])
    assert torch.isnan(sealed.qerr).all() and torch.isnan(sealed.attention).all()


def test_a_freed_request_keeps_full_blocks_for_sealing_and_releases_the_rest():
    book = SealBook(BS)
    tokens = [1, 1, 2, 2, 3, 3, 1, 1, 9]
    book.mark_sealed(20, book.collect("r", [20], 4, tokens)[20])
    book.free_request("r", [20, 21, 22], num_full=2, tokens=tokens, keep_full=True)
    freed = book.take_freed_full()
    assert list(freed) == [21] and freed[21].prior_count == naive_prior(tokens, 4)
    assert book.take_releases() == [22] and book.take_releases() == []
    assert book.take_freed_full() == {}
    book.free_request("s", [30, 31], num_full=1, tokens=tokens, keep_full=False)  # no prefix caching
    assert book.take_releases() == [30, 31]


def test_forget_drops_a_pending_freed_block():
    book = SealBook(BS)
    book.free_request("r", [7], num_full=1, tokens=[1, 2, 3, 4], keep_full=True)
    book.forget(7)
    assert book.take_freed_full() == {}


def test_pending_work_keeps_the_engine_stepping_until_handed_over():
    book = SealBook(BS)
    assert not book.has_pending()
    book.free_request("r", [7, 8], num_full=1, tokens=[1, 2, 3, 4, 5], keep_full=True)
    assert book.has_pending()  # block 7 must seal, block 8 must be released
    book.take_releases()
    freed = book.take_freed_full()
    assert not book.has_pending() and list(freed) == [7]
