"""SealBook: the scheduler's per-block bookkeeping, in plain Python (no vLLM import, tested alone).

What it knows, and for how long:
    sealed        block ids whose page is written (until vLLM hands the id out again)
    qerr          block id -> [block_size, NUM_QERR] quantization error of its tokens, reported by
                  the worker that wrote them (until the block seals)
    attention     block id -> [block_size] attention its tokens received inside the block, reported
                  by the worker when the block filled (until the block seals)
    sampled       request id -> {position: (entropy, probability)} of its sampled (and, with
                  prompt_features, prompt) tokens not sealed yet
    counts        request id -> running token counts of its sequence up to the next block to seal:
                  a block's prior counts (the rarity features) cost O(block_size), not O(prefix)
    freed_full    full blocks of freed requests that stay in the prefix cache: sealed next step
    releases      partial blocks of freed requests: their staging is released, they never seal

A `Candidate` is a full block waiting to seal, with everything the policy needs from its writer, so
it outlives the request that wrote it. Every feature is a function of the block's content and its
prefix, which keeps bits a deterministic function of the prefix (engine/scheduler.py).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import torch

from adakv_vllm.controller.features import NUM_QERR
from adakv_vllm.controller.policy import BlockTokens

_UNKNOWN = (float("nan"), float("nan"))


@dataclasses.dataclass
class Candidate:
    """A full block waiting to seal."""

    request_id: str
    start: int  # position of the block's first token in its sequence
    token_ids: list[int]  # [block_size]
    prior_count: list[int]  # [block_size] earlier occurrences of each token id in the sequence
    sampled: list[tuple[float, float]]  # [block_size] (entropy, probability), NaN = unknown


@dataclasses.dataclass(frozen=True)
class SealList:
    """What the scheduler attaches to a step's SchedulerOutput (`adakv_seal`): the worker seals these
    blocks before the step's forward. Pickled to the worker processes."""

    block_ids: torch.Tensor  # [n] int64
    key_bits: torch.Tensor  # [n, block_size] int64, each token's key precision
    value_bits: torch.Tensor  # [n, block_size] int64, each token's value precision
    owners: list[str]  # [n] the request that wrote each block, for warnings


class _Counts:
    """Token counts of one sequence's positions [0, upto)."""

    def __init__(self):
        self.upto = 0
        self.counter: collections.Counter[int] = collections.Counter()


class SealBook:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.sealed: set[int] = set()
        self._qerr: dict[int, torch.Tensor] = {}
        self._attention: dict[int, list[float]] = {}
        self._sampled: dict[str, dict[int, tuple[float, float]]] = {}
        self._counts: dict[str, _Counts] = {}
        self._freed_full: dict[int, Candidate] = {}
        self._releases: list[int] = []

    # ---- candidates --------------------------------------------------------------------------------
    def collect(self, request_id: str, block_ids: Sequence[int], num_computed: int, tokens: Sequence[int]):
        """{block id: Candidate} for the full, unsealed blocks of a running request, in position order.

        block_ids: the request's blocks; num_computed: its tokens already in the cache; tokens: all
        its token ids (prompt + output)."""
        out = {}
        for i in range(min(num_computed // self.block_size, len(block_ids))):
            if block_ids[i] not in self.sealed:
                out[block_ids[i]] = self._candidate(request_id, i * self.block_size, tokens)
        return out

    def take_freed_full(self) -> dict[int, Candidate]:
        """Full blocks of requests freed since the last call that are still unsealed."""
        out = {b: c for b, c in self._freed_full.items() if b not in self.sealed}
        self._freed_full = {}
        return out

    def has_pending(self) -> bool:
        """Blocks of freed requests still to seal or release: the engine must step once more even
        with no request left, or their staging would stay held while it idles."""
        return bool(self._releases) or any(b not in self.sealed for b in self._freed_full)

    def take_releases(self) -> list[int]:
        out, self._releases = self._releases, []
        return out

    def _candidate(self, request_id: str, start: int, tokens: Sequence[int]) -> Candidate:
        bs = self.block_size
        block = list(tokens[start : start + bs])
        counts = self._counts.setdefault(request_id, _Counts())
        if counts.upto > start:  # an earlier block than the last one counted: count afresh
            counts.upto, counts.counter = 0, collections.Counter()
        counts.counter.update(tokens[counts.upto : start])
        prior = []
        for token in block:
            prior.append(counts.counter[token])
            counts.counter[token] += 1
        counts.upto = start + bs
        sampled = self._sampled.get(request_id, {})
        return Candidate(
            request_id, start, block, prior, [sampled.get(p, _UNKNOWN) for p in range(start, start + bs)]
        )

    def block_tokens(self, block: int, c: Candidate) -> BlockTokens:
        """What the policy sees of a candidate (qerr as the worker reported it, NaN where not)."""
        bs = self.block_size
        qerr = self._qerr.get(block)
        attention = self._attention.get(block)
        prior = torch.tensor(c.prior_count, dtype=torch.int64)
        return BlockTokens(
            token_ids=torch.tensor(c.token_ids, dtype=torch.int64),
            positions=torch.arange(c.start, c.start + bs),
            qerr=qerr if qerr is not None else torch.full((bs, NUM_QERR), float("nan")),
            first_occurrence=prior == 0,
            prior_count=prior,
            sampled=torch.tensor(c.sampled, dtype=torch.float32),
            attention=torch.tensor(attention if attention is not None else [float("nan")] * bs),
        )

    # ---- sealing and re-allocation ---------------------------------------------------------------
    def mark_sealed(self, block: int, c: Candidate) -> None:
        self.sealed.add(block)
        self._qerr.pop(block, None)
        self._attention.pop(block, None)
        sampled = self._sampled.get(c.request_id)
        if sampled:
            for position in range(c.start, c.start + self.block_size):
                sampled.pop(position, None)

    def forget(self, block: int) -> None:
        """vLLM handed `block` out afresh: whatever it held (a sealed page, a pending seal) is gone."""
        self.sealed.discard(block)
        self._qerr.pop(block, None)
        self._attention.pop(block, None)
        self._freed_full.pop(block, None)

    # ---- features reported by the worker ---------------------------------------------------------
    def store_qerr(self, slots: torch.Tensor, qerr: torch.Tensor) -> None:
        """slots: [T] int64 vLLM slots; qerr: [T, NUM_QERR]."""
        bs = self.block_size
        for block, offset, row in zip((slots // bs).tolist(), (slots % bs).tolist(), qerr, strict=True):
            table = self._qerr.get(block)
            if table is None:
                table = self._qerr[block] = torch.full((bs, NUM_QERR), float("nan"))
            table[offset] = row

    def store_attention(self, attention: dict[int, list[float]]) -> None:
        """{block id: [block_size] mean attention received} of blocks that just filled."""
        self._attention.update(attention)

    def record_sampled(self, request_id: str, positions: Sequence[int], values: Sequence[tuple]) -> None:
        self._sampled.setdefault(request_id, {}).update(zip(positions, values, strict=True))

    # ---- freeing ---------------------------------------------------------------------------------
    def free_request(
        self, request_id: str, block_ids: Sequence[int], num_full: int, tokens: Sequence[int], keep_full: bool
    ) -> None:
        """A request leaves (finished, aborted, preempted). Its full blocks stay in the prefix cache
        when `keep_full` and must still seal; every other unsealed block is released."""
        for i, block in enumerate(block_ids):
            if block in self.sealed:
                continue
            if i < num_full and keep_full:
                self._freed_full[block] = self._candidate(request_id, i * self.block_size, tokens)
            else:
                self._releases.append(block)
        self._sampled.pop(request_id, None)
        self._counts.pop(request_id, None)
