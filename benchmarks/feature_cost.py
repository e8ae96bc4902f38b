"""Per-step cost of the controller's features and decisions, on SmolLM2-135M shapes (no engine).

    .venv/bin/python benchmarks/feature_cost.py [--repeats 20]

Worker side, every step: the store's quantization-error feature (the errors at QERR_BITS of each
written token in each of the 30 layers) -- the staging writes of a step with it (compiled kernel, and its
torch oracle, the fallback where no compiler is available) and without it.
Scheduler side, once per sealing block: BlockTokens -> features -> policy -> planner (keys and values,
at K3.5/V2.5), for each policy.
Prints milliseconds per call; figures are for this machine, compare them with a decode step's time.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from adakv_vllm.blocks import planner
from adakv_vllm.blocks.store import KVStore
from adakv_vllm.controller.features import NUM_QERR
from adakv_vllm.controller.policy import PARTS, BlockTokens, controller_expectations, make_policy
from adakv_vllm.kernels import library
from adakv_vllm.quant import format as fmt

LAYERS, HEADS, HEAD_SIZE, BLOCK, VOCAB = 30, 3, 64, 32, 49152


def timed(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def worker_cost(num_tokens: int, repeats: int) -> tuple[float, float, float]:
    record = fmt.RecordLayout(HEAD_SIZE, 32)
    layout = fmt.PageLayout(BLOCK, HEADS, record, fmt.page_bytes_for_target(BLOCK, HEADS, record, 4.0, 4.0))
    store = KVStore(layout, LAYERS, 4096, torch.bfloat16, max_staging_slots=256)
    slots = torch.arange(num_tokens, dtype=torch.int64)
    key = torch.randn(num_tokens, HEADS, HEAD_SIZE).bfloat16()
    value = torch.randn(num_tokens, HEADS, HEAD_SIZE).bfloat16()

    def step(features: bool):
        store.begin_step()
        for layer in range(LAYERS):
            store.write(layer, slots, key, value)
        if features:
            store.step_features()

    compiled = timed(lambda: step(True), repeats)
    with mock.patch.object(library, "load", lambda: None):
        oracle = timed(lambda: step(True), repeats)
    without = timed(lambda: step(False), repeats)
    return compiled, oracle, without


def scheduler_cost(policy_name: str, repeats: int) -> float:
    key_bits, value_bits = 3.5, 2.5
    record = fmt.RecordLayout(HEAD_SIZE, 32)
    page_bytes = fmt.page_bytes_for_target(BLOCK, HEADS, record, key_bits, value_bits)
    layout = fmt.PageLayout(BLOCK, HEADS, record, page_bytes)
    cost, budgets = layout.token_costs(), layout.part_budgets(key_bits, value_bits)
    extra = {}
    if policy_name == "learned":
        extra = dict(vocab_size=VOCAB, expect=controller_expectations(32))
    policy = make_policy(policy_name, key_bits, value_bits, sink_tokens=4, **extra)
    block = BlockTokens(
        token_ids=torch.randint(0, VOCAB, (BLOCK,)),
        positions=torch.arange(64, 64 + BLOCK),
        qerr=torch.rand(BLOCK, NUM_QERR) * torch.logspace(-0.3, -2.3, NUM_QERR),
        first_occurrence=torch.ones(BLOCK, dtype=torch.bool),
        sampled=torch.full((BLOCK, 2), float("nan")),
        prior_count=torch.zeros(BLOCK, dtype=torch.int64),
        attention=torch.rand(BLOCK),
    )

    def decide():
        for part, budget in zip(PARTS, budgets, strict=True):
            weight, distortion = policy.scores(block, part)
            planner.allocate(weight, distortion, cost, budget, policy.floor(block, part))

    return timed(decide, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("worker: KVStore.write over 30 layers, ms per step (quantization-error feature")
    print("        compiled / torch oracle / off)")
    for n in (1, 16, 512):
        on, oracle, off = worker_cost(n, args.repeats)
        print(f"  {n:4d} tokens  {on:8.2f} / {oracle:8.2f} / {off:8.2f}   feature share {1 - off / on:.0%}")
    print("scheduler: one sealing block of 32 tokens at K3.5/V2.5, ms (features + policy + planner)")
    for name in ("random", "attention", "rule", "learned"):
        try:
            print(f"  {name:9s} {scheduler_cost(name, args.repeats):8.3f}")
        except ValueError as e:  # the learned policy without weights for this quantizer
            print(f"  {name:9s} unavailable: {e}")


if __name__ == "__main__":
    main()
