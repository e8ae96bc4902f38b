"""The learned policy's inputs in real vLLM: prompt features reach the scheduler; bad weights fail at start.

No controller is shipped for the current quantizer (README: the learned controller), so the feature
path is exercised under the rule policy, which receives the same BlockTokens."""

from __future__ import annotations

import math

import pytest
import torch

from tests.e2e.conftest import run_probe
from tests.e2e.test_engine import STOCK, _check_bit_map, adakv

# One ~160-token prompt: five full blocks are sealed, their prompt tokens carrying the distribution
# features that `prompt_features` computes.
PASSAGE = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a screw press adapted from wine making. "
    "Within fifty years presses operated in more than two hundred cities across Europe, and the "
    "price of books fell so sharply that reading spread from monasteries and universities to "
    "merchants and craftsmen. Historians still debate how quickly literacy rose, but the number of "
    "printed titles grew every decade, and pamphlets carried news, sermons and scientific results "
    "to readers who had never owned a manuscript."
)


def test_prompt_features_reach_the_policy(probe):
    spec = adakv(
        {"target_bits": 3, "policy": "rule", "prompt_features": True},
        prompts=[PASSAGE],
        max_tokens=8,
        inspect=True,
    )
    ours = probe(spec)
    assert ours["sealed_blocks"], "nothing was sealed"
    _check_bit_map(ours)
    bits = [b for row in ours["decided_key_bits"] for b in row]
    assert len(set(bits)) > 1  # the policy mixes precisions inside the budget
    # every sealed prompt token after the first had the distribution that predicted it
    features = {int(p): (e, q) for p, e, q in ours["sampler_features"]}
    num_sealed = 32 * len(ours["sealed_blocks"])
    assert set(range(1, num_sealed)) <= set(features)
    reference = _teacher_forced(PASSAGE, num_sealed)
    d_entropy = torch.tensor([features[p][0] - reference[p][0] for p in range(1, num_sealed)]).abs()
    d_logp = torch.tensor(
        [math.log(features[p][1]) - math.log(reference[p][1]) for p in range(1, num_sealed)]
    ).abs()
    # bf16 engine vs fp32 reference: logits differ by ~0.1 (measured max 0.2 nats in log p); a
    # position off by one would give differences of several nats at most positions
    assert float(d_entropy.median()) < 0.05 and float(d_logp.median()) < 0.05
    assert float(d_entropy.max()) < 0.5 and float(d_logp.max()) < 0.5


def _teacher_forced(text: str, n: int) -> dict[int, tuple[float, float]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adakv_vllm.model_store import resolve_model

    path = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([tokenizer(text).input_ids[:n]])
    with torch.no_grad():
        logp = model(ids).logits[0].log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return {p: (float(entropy[p - 1]), float(logp[p - 1, ids[0, p]].exp())) for p in range(1, n)}


@pytest.mark.parametrize(
    "case, options, needle",
    [
        ("missing file", {"controller_weights": "/nonexistent/c.safetensors"}, "file not found"),
        ("corrupt file", {"controller_weights": "CORRUPT"}, "not a readable safetensors"),
    ],
)
def test_bad_controller_weights_fail_at_start_with_a_clear_error(tmp_path, case, options, needle):
    if options["controller_weights"] == "CORRUPT":
        bad = tmp_path / "corrupt.safetensors"
        bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
        options = {"controller_weights": str(bad)}
    spec = {**STOCK, "adakv": {"target_bits": 3, "policy": "learned", **options}, "max_tokens": 4}
    with pytest.raises(AssertionError, match=needle):
        run_probe(spec)
