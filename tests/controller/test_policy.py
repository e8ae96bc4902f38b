"""Policies and the budget planner (keys and values planned apart, each under its own share)."""

from __future__ import annotations

import pytest
import torch

from adakv_vllm.blocks.planner import allocate
from adakv_vllm.controller.policy import PARTS, BlockTokens, content_seed, make_policy
from adakv_vllm.quant import format as fmt
from adakv_vllm.quant.precision import ALL_BITS, PRECISIONS

T = 32
RECORD = fmt.RecordLayout(64, 64)
COST = torch.tensor([3 * RECORD.record_bytes(p) for p in PRECISIONS])  # one part, three KV heads


def budget(target):
    return int(T * 3 * RECORD.interpolated_bytes(target))


def block(seed=0, start=0):
    gen = torch.Generator().manual_seed(seed)
    typical = torch.tensor([0.33, 0.17, 0.083, 0.0057])
    qerr = typical * (0.7 + 0.6 * torch.rand(T, 4, generator=gen))
    return BlockTokens(
        token_ids=torch.randint(0, 1000, (T,), generator=gen),
        positions=torch.arange(start, start + T),
        qerr=qerr,
        first_occurrence=torch.rand(T, generator=gen) > 0.5,
        attention=torch.rand(T, generator=gen),
    )


def plan(policy, b, target, part="key"):
    weight, distortion = policy.scores(b, part)
    assert distortion.shape == (T, len(PRECISIONS))
    return allocate(weight, distortion, COST, budget(target), policy.floor(b, part))


BUDGET_CASES = [("static", t) for t in ALL_BITS] + [
    (name, t) for name in ("random", "attention", "rule") for t in (2, 2.5, 3, 3.5, 4, 8, 16)
]


@pytest.mark.parametrize("name,target", BUDGET_CASES)
def test_budget_holds_and_is_used(name, target):
    bits = plan(make_policy(name, target, target, 0, 4), block(), target)
    cost = sum(int(COST[list(ALL_BITS).index(int(b))]) for b in bits)
    assert cost <= budget(target)
    # the budget is not wasted: the average is within one step of the target
    assert bits.float().mean() >= target - 1.0


@pytest.mark.parametrize("target", ALL_BITS)
def test_static_is_uniform_per_part(target):
    policy = make_policy("static", target, 2)
    assert (plan(policy, block(), target, "key") == target).all()
    assert (plan(policy, block(), 2, "value") == 2).all()


def test_random_is_a_function_of_content():
    policy = make_policy("random", 3, 3, seed=1)
    assert torch.equal(plan(policy, block(seed=3), 3), plan(policy, block(seed=3), 3))
    assert not torch.equal(plan(policy, block(seed=3), 3), plan(policy, block(seed=4), 3))
    assert content_seed(block(seed=3), 1) != content_seed(block(seed=3), 2)
    # keys and values draw different random orders
    assert not torch.equal(plan(policy, block(), 3.5, "key"), plan(policy, block(), 3.5, "value"))


def test_random_mixes_at_fractional_target():
    bits = plan(make_policy("random", 3.5, 3.5), block(), 3.5)
    assert len(set(bits.tolist())) > 1 and set(bits.tolist()) <= {2, 3, 4}


def test_attention_gives_the_bits_to_the_most_attended_tokens():
    b = block(seed=5)
    bits = plan(make_policy("attention", 3.5, 3.5), b, 3.5)
    upgraded, kept = b.attention[bits > 3], b.attention[bits <= 3]
    assert upgraded.min() >= kept.max()
    # unmeasured tokens (NaN) take the block's median; a block with none measured is uniform
    b.attention[:] = float("nan")
    assert set(plan(make_policy("attention", 4, 4), b, 4).tolist()) == {4}


def _blocks_with_unmeasured_tokens():
    """Blocks whose attention is fully, partly (an odd and an even count), not at all measured, or absent."""
    blocks = [block(seed=s) for s in range(5)]
    blocks[1].attention[::3] = float("nan")  # 21 measured: one middle value
    blocks[2].attention[:6] = float("nan")  # 26 measured: the lower of the two middle values
    blocks[3].attention[:] = float("nan")
    blocks[4].attention = None
    return blocks


@pytest.mark.parametrize("name", ["static", "random", "attention", "rule"])  # learned: Policy's loop
def test_scores_many_equals_scores_block_by_block(name):
    policy = make_policy(name, 3.5, 3, 0, 4)
    blocks = _blocks_with_unmeasured_tokens()
    for part in PARTS:
        weight, distortion = policy.scores_many(blocks, part)
        for i, b in enumerate(blocks):
            w, d = policy.scores(b, part)
            assert torch.equal(weight[i], w) and torch.equal(distortion[i], d), (part, i)


def test_attention_fills_unmeasured_tokens_with_the_blocks_lower_median():
    policy = make_policy("attention", 3.5, 3.5)
    weight, _ = policy.scores_many(_blocks_with_unmeasured_tokens(), "key")
    for i, b in enumerate(_blocks_with_unmeasured_tokens()):
        a = b.attention if b.attention is not None else torch.full((T,), float("nan"))
        known = ~torch.isnan(a)
        fill = a[known].median() if known.any() else torch.tensor(1.0)  # torch.median: the lower middle
        assert torch.equal(weight[i], torch.where(known, a, fill).clamp_min(0.0)), i


def test_rule_grants_sinks_and_prefers_high_error_tokens():
    b = block()
    bits = plan(make_policy("rule", 3, 3, sink_tokens=4), b, 3)
    assert (bits[:4] >= 8).all()
    later = make_policy("rule", 3, 3, sink_tokens=4)
    b2 = block(start=T)  # no sinks in a later block
    bits2 = plan(later, b2, 2.5)
    gain = b2.qerr[:, 0] ** 2 - b2.qerr[:, 1] ** 2
    upgraded, kept = gain[bits2 > 2], gain[bits2 == 2]
    assert upgraded.mean() > kept.mean()


def test_planner_rejects_impossible_budget():
    with pytest.raises(ValueError, match="budget"):
        allocate(torch.ones(T), torch.zeros(T, len(PRECISIONS)), COST, 10)


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("learned-ish", 4, 4)


def test_parts_are_keys_then_values():
    assert PARTS == ("key", "value")
