"""The plugin inside real vLLM on CPU with the embedded model (tests/e2e/probe.py runs each engine)."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import PROMPTS

LLM_ARGS = {"max_num_seqs": 8, "max_num_batched_tokens": 512}
STOCK = {"adakv": None, "llm": LLM_ARGS, "prompts": PROMPTS, "max_tokens": 64}


def adakv(options: dict, **extra) -> dict:
    return {**STOCK, "adakv": options, **extra}


def prefix_share(a: dict, b: dict) -> float:
    """The share of generated tokens produced before the first divergence: sum over prompts of the
    common prefix of the two continuations over the sum of their lengths (the longer of the two).
    After a divergence the continuations are not comparable, so nothing after it counts."""
    common = total = 0
    for x, y in zip(a["token_ids"], b["token_ids"], strict=True):
        for u, v in zip(x, y, strict=True):  # each sample of the prompt
            n = next((i for i, (p, q) in enumerate(zip(u, v, strict=False)) if p != q), min(len(u), len(v)))
            common += n
            total += max(len(u), len(v))
    return common / total


def same_start(a: dict, b: dict, n: int = 8) -> int:
    """How many prompts' first samples begin with the same n tokens in both runs."""
    return sum(x[0][:n] == y[0][:n] for x, y in zip(a["token_ids"], b["token_ids"], strict=True))


# The scratch path runs vLLM's own kernel over the very bytes stock caches, so at 16 bits it is
# bit-exact; the fused decode kernel sums in another order (equal up to a last-bit bf16 rounding, see
# tests/e2e/test_cpu_fused.py). Exact-equality checks of the cache bookkeeping use the scratch path.
SCRATCH = {"ADAKV_CPU_ATTENTION": "scratch"}


def test_16_bits_matches_stock(probe):
    """At 16 bits through the scratch path AdaKV runs vLLM's own kernel over the very bytes stock
    caches, so it matches stock as closely as stock matches itself. That is not token for token on
    this machine: two stock runs of these 8 prompts (same settings, block size 32, split-KV off)
    differed in 2 of them, at tokens 5 and 24, and so did AdaKV against either (this code: all 8
    equal, against stock at block size 32 and 128 alike). A wrong page, slot or block table changes
    most continuations from their first tokens."""
    # stock at its defaults: block size 128, the scratch's (vLLM's kernel accumulates block by block)
    stock = probe(STOCK)
    ours = probe(adakv({"target_bits": 16, "policy": "rule"}), env=SCRATCH)
    identical = sum(a == b for a, b in zip(ours["token_ids"], stock["token_ids"], strict=True))
    assert identical >= 5, identical
    assert prefix_share(ours, stock) >= 0.7


def test_static_8_bits_close_to_stock_and_bit_map_readback(probe):
    stock = probe(STOCK)
    ours = probe(adakv({"target_bits": 8, "policy": "static"}, inspect=True))
    # measured 0.71 of the generated tokens before the first divergence on an Intel AVX-512 CPU, 0.48
    # on a Zen 5 (16 bits through the fused kernel: 0.76 and 0.46; the roundings that flip greedy
    # near-ties dominate, and they differ per CPU); most prompts still start alike
    assert same_start(ours, stock) >= 6
    assert prefix_share(ours, stock) >= 0.4
    assert ours["sealed_blocks"], "nothing was sealed: the test does not exercise pages"
    assert all(row == [8] * len(row) for row in ours["read_key_bits"])
    _check_bit_map(ours)


def test_4_bits_paris_capacity_and_bit_map(probe):
    stock = probe(STOCK)
    ours = probe(adakv({"target_bits": 4, "policy": "rule"}, inspect=True))
    assert "Paris" in ours["texts"][0][0]
    _check_bit_map(ours)
    capacity = ours["num_gpu_blocks"] * ours["block_size"]
    stock_capacity = stock["num_gpu_blocks"] * stock["block_size"]
    assert capacity >= 3 * stock_capacity, (capacity, stock_capacity)


def _check_bit_map(report: dict) -> None:
    """The bit map read back from the KV tensor equals the policy's decision; pages fit."""
    assert report["read_key_bits"] == report["decided_key_bits"]
    assert report["read_value_bits"] == report["decided_value_bits"]
    assert max(report["used_bytes"]) <= report["page_bytes"]


@pytest.mark.parametrize("bits", [16, 4])
def test_preemption_keeps_outputs(probe, bits):
    """A KV cache of 12 blocks cannot hold 8 sequences of ~170 tokens: vLLM preempts and recomputes.

    Below 16 bits a recomputed token's K/V can also differ from the first computation in the last
    bf16 bit (prefill vs decode kernels), which the quantizer can turn into another code.
    """
    # Both runs get the minimum staging reserve (12 blocks leave no more), so the scheduler admits
    # the requests in the same steps and the batches match until the tight run preempts (a row's
    # bf16 matmul result depends on how many rows share the step). Long outputs make even the few
    # requests admitted at once outgrow 12 blocks.
    options = {"target_bits": bits, "policy": "static", "staging_fraction": 1e-6}
    short = {**LLM_ARGS, "max_model_len": 256}
    env = SCRATCH if bits == 16 else None  # recomputation is prefill, the first pass decode
    long = {"max_tokens": 160}
    roomy = probe(adakv(options, inspect=True, llm=short, **long), env=env)
    tight = probe(adakv(options, inspect=True, llm={**short, "num_gpu_blocks_override": 12}, **long), env=env)
    assert roomy["preemptions"] == 0 and tight["preemptions"] > 0
    # Recomputation changes which rows share a step, and stock vLLM's bf16 matmuls are not batch
    # invariant on this machine (one prompt alone and in a batch first differed at token 18): outputs
    # agree for long stretches, not exactly (measured at 4 bits: 0.76 of the tokens before the first
    # divergence). Staging, seal state and prefix hits after resumption are checked by the bit map.
    assert prefix_share(tight, roomy) >= 0.6
    _check_bit_map(tight)


LONG = (
    "The Amazon rainforest covers much of the Amazon basin of South America. The basin spans seven "
    "million square kilometres, of which five and a half million are covered by the rainforest. The "
    "region includes territory belonging to nine nations, and most of the forest lies within Brazil, "
    "followed by Peru and Colombia. The rainforest likely formed during the Eocene era, after a global "
    "reduction of tropical temperatures when the Atlantic Ocean had widened enough to provide a warm, "
    "moist climate to the basin. It has been in existence for at least fifty-five million years. "
    "Question: which country holds most of the rainforest? Answer:"
)


def test_prefix_sharing_and_chunked_prefill(probe):
    """Two requests share a ~150-token prompt, prefilled in 64-token chunks.

    Rule for shared blocks: a block is sealed once and every request reads that page; because the
    bits are a function of the block's content, the result equals a run without prefix caching.
    """
    spec = adakv(
        {"target_bits": 3, "policy": "rule"},
        inspect=True,
        prompts=[LONG, LONG, PROMPTS[0]],
        max_tokens=40,
        llm={**LLM_ARGS, "max_num_batched_tokens": 64, "max_num_seqs": 4},
    )
    shared = probe(spec)
    private = probe({**spec, "llm": {**spec["llm"], "enable_prefix_caching": False}})
    _check_bit_map(shared)
    assert shared["token_ids"][0] == shared["token_ids"][1]
    # the same pages are read with and without prefix caching; the runs batch the short prompt with
    # different steps of the long ones, so it may take another greedy near-tie late (see preemption)
    assert shared["token_ids"][:2] == private["token_ids"][:2]
    assert prefix_share(shared, private) >= 0.8
    assert shared["num_decisions"] < private["num_decisions"]  # shared blocks were sealed once


def test_n_greater_than_one(probe):
    """n=3 seeded samples per request. (Seeded sampling with *chunked* prefill crashes in vLLM 0.32 on
    CPU, stock included: 'CPU Generator does not use offset'; these prompts fit one chunk.)"""
    report = probe(
        adakv({"target_bits": 3, "policy": "random"}, prompts=PROMPTS[:3], n=3, temperature=0.9, seed=1)
    )
    for completions in report["token_ids"]:
        assert len(completions) == 3 and all(completions)
        assert len({tuple(c) for c in completions}) > 1  # really sampled, not copied
