"""The sampled-token features the worker reports."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("vllm")


def test_entropy_ignores_tokens_a_grammar_masked_out():
    from adakv_vllm.engine.worker import entropy_of

    # structured output sets the logits of forbidden tokens to -inf in place before sampling
    logits = torch.tensor([[2.0, 1.0, float("-inf"), float("-inf")], [0.0, 0.0, 0.0, 0.0]])
    entropy = entropy_of(torch.log_softmax(logits, dim=-1))
    p = torch.softmax(torch.tensor([2.0, 1.0]), 0)
    assert torch.isfinite(entropy).all()
    assert entropy[0].item() == pytest.approx(-(p * p.log()).sum().item())
    assert entropy[1].item() == pytest.approx(math.log(4))
