"""The slow sweep (`make test-slow`): tensor parallelism and torch.compile through the plugin."""

from __future__ import annotations

import pytest

from tests.e2e.test_engine import LLM_ARGS, SCRATCH, STOCK, adakv, prefix_share, same_start

pytestmark = pytest.mark.slow


TP3 = {**LLM_ARGS, "tensor_parallel_size": 3}
TP3_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1|1"}  # three ranks on this machine's two cores


def test_tensor_parallel_3(probe):
    """SmolLM2 has 3 KV heads: TP=3 gives each rank one head, its own store, staging and pages.

    Exactness: at 16 bits the scratch path feeds vLLM's kernel the bytes stock caches, so AdaKV TP=3
    equals stock TP=3 token for token (a rank reading another rank's head or a mis-sized page would
    not). Quantized: TP=3 changes the all-reduce's rounding, so 4-bit TP=3 is held to the closeness
    stock TP=3 has to stock TP=1, within a margin for the flips quantization adds."""
    stock_tp3 = probe({**STOCK, "llm": TP3}, env=TP3_ENV)
    ours_tp3 = probe(adakv({"target_bits": 16}, llm=TP3), env={**TP3_ENV, **SCRATCH})
    assert ours_tp3["num_gpu_blocks"] > 0
    assert ours_tp3["token_ids"] == stock_tp3["token_ids"]

    options = {"target_bits": 4, "policy": "static"}
    tp1 = probe(adakv(options))
    tp3 = probe(adakv(options, llm=TP3), env=TP3_ENV)
    stock_tp1 = probe(STOCK)
    stock_agreement = prefix_share(stock_tp3, stock_tp1)
    agreement = prefix_share(tp3, tp1)
    print(f"token agreement TP=3 vs TP=1: stock {stock_agreement:.3f}, adakv 4-bit {agreement:.3f}")
    # measured: stock 0.975, adakv 0.972; a rank reading the wrong head or page gives garbage (< 0.5)
    assert agreement >= stock_agreement - 0.1, (agreement, stock_agreement)


def test_torch_compile_mode(probe):
    """enforce_eager=False: vLLM compiles the model around the attention op (CPU: no CUDA graphs).

    Compilation changes stock vLLM's own numerics (fused elementwise ops), so the reference is stock
    compiled. The scratch path at 16 bits feeds vLLM's kernel the bytes stock caches: token for token.
    The default fused path is held to the closeness it has to stock in eager mode (test_cpu_fused)."""
    compiled = {**LLM_ARGS, "enforce_eager": False}
    stock = probe({**STOCK, "llm": compiled})
    scratch = probe(adakv({"target_bits": 16}, llm=compiled), env=SCRATCH)
    assert scratch["token_ids"] == stock["token_ids"]
    fused = probe(adakv({"target_bits": 16}, llm=compiled))
    same = same_start(fused, stock)
    assert same >= 6
    agreement = prefix_share(fused, stock)
    print(f"compiled: fused 16-bit vs stock {agreement:.3f}, same first 8 tokens {same}/8")
    assert agreement >= 0.9
