"""The slow sweep (`make test-slow`): tensor parallelism and torch.compile through the plugin."""

from __future__ import annotations

import pytest

from tests.e2e.test_engine import LLM_ARGS, STOCK, adakv

pytestmark = pytest.mark.slow


def test_tensor_parallel_3_matches_tp1(probe):
    """SmolLM2 has 3 KV heads: TP=3 gives each rank one head and its own pages (two cores here)."""
    options = {"target_bits": 4, "policy": "static"}
    tp1 = probe(adakv(options))
    tp3 = probe(
        adakv(options, llm={**LLM_ARGS, "tensor_parallel_size": 3}),
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1|1"},
    )
    assert tp3["num_gpu_blocks"] > 0
    agree = sum(a[0][:16] == b[0][:16] for a, b in zip(tp1["token_ids"], tp3["token_ids"], strict=True))
    assert agree >= 6  # TP changes reduction order; most greedy prefixes still match


def test_torch_compile_mode(probe):
    stock = probe(STOCK)
    compiled = probe(adakv({"target_bits": 16}, llm={**LLM_ARGS, "enforce_eager": False}))
    assert compiled["token_ids"] == stock["token_ids"]
