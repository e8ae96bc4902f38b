"""The compiled seal planner (csrc/cpu_plan.cpp) against its oracle, blocks/planner.allocate."""

from __future__ import annotations

import pytest
import torch

from adakv_vllm.blocks import planner
from adakv_vllm.controller.policy import PARTS, make_policy
from adakv_vllm.kernels import cpu, library
from adakv_vllm.quant.precision import PRECISIONS
from tests.controller.test_policy import COST, T, block, budget


@pytest.fixture(scope="module")
def module():
    return library.build()


def _oracle(weight, distortion, cost, budget_bytes, floor=None):
    return torch.stack(
        [
            planner.allocate(
                weight[i], distortion[i], cost, budget_bytes, None if floor is None else floor[i]
            )
            for i in range(weight.shape[0])
        ]
    )


@pytest.mark.parametrize("name", ["static", "random", "attention", "rule"])
@pytest.mark.parametrize("target", [2.5, 4, 5.5])
def test_policies_pages_match_the_oracle(module, name, target):
    policy = make_policy(name, target, target, sink_tokens=4)
    blocks = [block(seed, start=seed * T) for seed in range(12)]  # the first holds the sinks
    for part in PARTS:
        scores = [policy.scores(b, part) for b in blocks]
        floors = [policy.floor(b, part) for b in blocks]
        weight = torch.stack([w for w, _ in scores])
        distortion = torch.stack([d for _, d in scores])
        floor = None if floors[0] is None else torch.stack(floors)
        expected = _oracle(weight, distortion, COST, budget(target), floor)
        assert torch.equal(planner.allocate_pages(weight, distortion, COST, budget(target), floor), expected)


def test_ties_zero_gains_and_tight_budgets_match_the_oracle(module):
    gen = torch.Generator().manual_seed(0)
    n = 64
    weight = torch.randint(0, 3, (n, T), generator=gen).float()  # many ties and zero weights
    distortion = torch.randint(0, 4, (n, T, len(PRECISIONS)), generator=gen).float()
    distortion = distortion.sort(dim=-1, descending=True).values  # non-increasing, with zero-gain steps
    distortion[::3, :, 2] = distortion[::3, :, 1]  # a step of zero gain before a step of gain
    floor = torch.full((n, T), PRECISIONS[0].bits)
    floor[:, :5] = 8
    for budget_bytes in (int(COST[0]) * T, budget(3), budget(4.2), budget(16)):
        for f in (None, floor):
            expected = _oracle(weight, distortion, COST, budget_bytes, f)
            assert torch.equal(planner.allocate_pages(weight, distortion, COST, budget_bytes, f), expected)


def test_not_finite_scores_are_left_to_the_oracle(module):
    weight, distortion = torch.rand(2, T), torch.rand(2, T, len(PRECISIONS)).sort(-1, descending=True).values
    weight[1, 3] = float("nan")
    assert cpu.plan_pages(weight, distortion, COST, budget(4), None, module) is None
    expected = _oracle(weight, distortion, COST, budget(4))
    assert torch.equal(planner.allocate_pages(weight, distortion, COST, budget(4)), expected)


def test_impossible_budget_and_bad_arguments_raise(module):
    weight, distortion = torch.ones(3, T), torch.zeros(3, T, len(PRECISIONS))
    with pytest.raises(ValueError, match="budget"):
        planner.allocate_pages(weight, distortion, COST, 10)
    with pytest.raises(ValueError, match="inconsistent"):
        cpu.plan_pages(weight, distortion, COST.flip(0), budget(4), None, module)  # costs must increase
    with pytest.raises(ValueError, match="inconsistent"):
        planner.allocate_pages(weight, distortion, COST, budget(4), torch.full((3, T), 32))  # no 32-bit code
    assert planner.allocate_pages(weight[:0], distortion[:0], COST, budget(4)).shape == (0, T)
