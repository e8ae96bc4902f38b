"""A bad request must not take the engine down: NaN K/V injected into one request while others run.

engine/faults.py writes NaN into the staged K and V of the request whose prompt holds the poison token
(the test-only ADAKV_TEST_POISON_TOKEN); its block must still seal (sanitised), the engine must finish
every request, and the other requests must decode exactly what they decode in a clean run of the same
batch (their tokens live in other blocks; ignore_eos keeps the batch shapes of both runs equal).
"""

from __future__ import annotations

from tests.e2e.conftest import PROMPTS

POISONED = "Our poison word for this test is xylophone, and then the story goes on and on"


def test_nan_in_one_request_leaves_the_engine_and_the_others_intact(probe, model_path):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_path)(POISONED)["input_ids"]
    others = set().union(*(AutoTokenizer.from_pretrained(model_path)(p)["input_ids"] for p in PROMPTS))
    token = next(t for t in ids[3:] if t not in others)
    spec = {
        "adakv": {"target_bits": 4},
        "prompts": [*PROMPTS, POISONED],
        "max_tokens": 48,
        "ignore_eos": True,
        "inspect": True,
    }
    clean = probe(spec)
    poisoned = probe(spec, env={"ADAKV_TEST_POISON_TOKEN": str(token)})
    assert poisoned["token_ids"][: len(PROMPTS)] == clean["token_ids"][: len(PROMPTS)]
    assert len(poisoned["token_ids"][-1][0]) == 48  # the poisoned request ran to the end too
    # every block that filled was sealed, the poisoned request's included
    assert poisoned["num_decisions"] == clean["num_decisions"] > len(PROMPTS)
    assert len(poisoned["sealed_blocks"]) == poisoned["num_decisions"]
