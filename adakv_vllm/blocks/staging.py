"""FP16 staging: the exact K/V of blocks that are not sealed yet, keyed by vLLM block id.

A block's tokens are written here as the model computes them; when the block is full the scheduler
decides the bits and the worker packs the page, then releases the slot. Staging is shared by all
requests (keyed by block id), so a prefix-cache hit on a block written in the same step finds it.

Staging is a scheduled resource (DESIGN.md section 2): its `max_slots` come out of the KV memory
budget (`reserve_slots`: a share of it, never more than the worst case the scheduler settings can
need), and the scheduler admits requests and sizes prefill chunks so that no step needs more
(`step_limits`). The slots are allocated once, up front, inside that budget; pages of the allocation
are only touched (and resident) as slots get used, lowest slots first.

Invariant: `slot_of_block[b] >= 0` iff block b has a slot; a slot belongs to at most one block.
"""

from __future__ import annotations

import dataclasses
import heapq
import math

import torch

from adakv_vllm.kernels import cpu, library

# The least reserve that lets every step make progress: a few running requests and a one-block chunk.
MIN_SLOTS = 8


def worst_case_slots(max_num_seqs: int, max_num_batched_tokens: int, block_size: int) -> int:
    """Open blocks one step can need at most: one partial block per running request, plus every
    block a step can fill (one per request boundary plus the batch's tokens)."""
    return 2 * max_num_seqs + math.ceil(max_num_batched_tokens / block_size) + 1


def reserve_slots(kv_bytes: int, slot_bytes: int, fraction: float, worst_case: int) -> int:
    """Staging slots for a KV cache of `kv_bytes` when staging takes `fraction` of the memory the
    two share: between MIN_SLOTS and `worst_case`. The worker charges the same number to vLLM's
    KV budget as the scheduler plans with (both compute it from the allocated KV cache)."""
    share = int(fraction / (1 - fraction) * kv_bytes // slot_bytes)
    return max(MIN_SLOTS, min(worst_case, share))


def step_limits(
    reserve: int, num_running: int, num_prefilling: int, block_size: int, max_tokens: int, max_admit: int
) -> tuple[int, int]:
    """-> (token budget, new requests allowed) for the next step, so that its writes fit `reserve`.

    A running request holds at most its partial block; a decode writes into it (or, at a block
    boundary, into one new block after its full one sealed). A prefill chunk of n tokens touches at
    most ceil(n / block_size) blocks from where it starts: at most n / block_size + 1 beyond the
    partial one a running request holds, and for a new request, which starts at a block boundary,
    at most n / block_size + 1 in all. With T tokens and A admissions, a step needs at most
        num_running + num_prefilling + A + T / block_size
    slots, and the limits keep that within the reserve (with one slot to spare). Half the free slots
    may go to admissions (at most max_admit, which the caller caps at the requests waiting); the rest sizes
    the chunks. At least one block of tokens is always granted, so running requests keep decoding."""
    free = reserve - num_running - num_prefilling - 1
    admit = max(0, min(max_admit, free // 2))
    tokens = block_size * (free - admit)
    return max(block_size, min(max_tokens, tokens)), admit


class StagingFullError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class WritePlan:
    valid: torch.Tensor | None  # [T] bool, the non-padding tokens; None: all of them
    rows: torch.Tensor  # [V] int64, each valid token's row in a layer's [slots * block_size] view
    sources: torch.Tensor | None  # [V] int64, the valid tokens' indices; None: all of them
    copy: cpu.StageRows | None  # the compiled copy of these rows, where the library builds


class StagingArea:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype,
        max_slots: int,
    ):
        self.num_layers, self.block_size = num_layers, block_size
        self.num_kv_heads, self.head_size, self.dtype = num_kv_heads, head_size, dtype
        self.max_slots = max_slots
        # key/value: [num_layers, max_slots, block_size, num_kv_heads, head_size]; uninitialised
        # (a slot is read only once written), so the OS commits pages as slots come into use
        self.key = torch.empty(num_layers, max_slots, block_size, num_kv_heads, head_size, dtype=dtype)
        self.value = torch.empty_like(self.key)
        # each layer's K and V as [max_slots * block_size] token rows, the rows of a WritePlan
        rows = (-1, num_kv_heads, head_size)
        self._rows = [
            (self.key[layer].view(rows), self.value[layer].view(rows)) for layer in range(num_layers)
        ]
        self.slot_of_block = torch.full((num_blocks,), -1, dtype=torch.int64)  # [num_blocks]
        self._free = list(range(max_slots))  # a heap: the lowest free slot is used first
        self.peak = 0  # the most slots ever in use at once
        # attention each staged token received inside its block, summed over layers, heads and
        # queries, and how many (layer, head, query) rows could see it: [max_slots, block_size] fp32
        self.received = torch.zeros(max_slots, block_size)
        self.seen = torch.zeros(max_slots, block_size)

    @staticmethod
    def slot_bytes(
        num_layers: int, block_size: int, num_kv_heads: int, head_size: int, elem_bytes: int
    ) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_size * elem_bytes

    @property
    def capacity(self) -> int:
        return self.max_slots

    @property
    def num_used(self) -> int:
        return self.max_slots - len(self._free)

    def assign(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Slots for `block_ids` ([n] int64), allocating for blocks without one. -> [n] int64.
        StagingFullError when none is free: the scheduler's step limits exist to prevent it."""
        missing = block_ids[self.slot_of_block[block_ids] < 0].unique().tolist()
        if len(missing) > len(self._free):
            raise StagingFullError(
                f"{len(missing)} blocks need FP16 staging but {len(self._free)} of {self.max_slots} "
                "slots are free"
            )
        for block in missing:
            slot = heapq.heappop(self._free)
            self.slot_of_block[block] = slot
            self.received[slot] = 0.0
            self.seen[slot] = 0.0
        self.peak = max(self.peak, self.num_used)
        return self.slot_of_block[block_ids]

    def release(self, block_ids) -> None:
        for block in block_ids:
            slot = int(self.slot_of_block[block])
            if slot >= 0:
                heapq.heappush(self._free, slot)
                self.slot_of_block[block] = -1

    def plan(self, slot_mapping: torch.Tensor) -> WritePlan:
        """Where the tokens of `slot_mapping` ([T] int64 vLLM slots, -1 = padding) go, allocating
        slots for blocks that have none. Every layer of a step writes the same slots: plan once."""
        valid = slot_mapping >= 0
        everything = bool(valid.all())
        slots = slot_mapping if everything else slot_mapping[valid]
        blocks, offsets = slots // self.block_size, slots % self.block_size
        rows = self.assign(blocks) * self.block_size + offsets
        sources = None if everything else valid.nonzero().flatten()
        module = library.load()
        copy = None if module is None else cpu.StageRows(self.key, self.value, rows, sources, module)
        return WritePlan(None if everything else valid, rows, sources, copy)

    def write_planned(self, layer: int, plan: WritePlan, key: torch.Tensor, value: torch.Tensor) -> None:
        """key, value: [T, num_kv_heads, head_size], the rows of the planned slot_mapping. By the
        compiled copy of kernels/cpu.py (K and V in one call) where it builds and the inputs are
        token rows of staging's dtype, else by torch (its oracle): the same bytes."""
        if plan.copy is not None and plan.copy(layer, key, value):
            return
        key_rows, value_rows = self.rows(layer)
        if plan.valid is not None:
            key, value = key[plan.valid], value[plan.valid]
        key_rows.index_copy_(0, plan.rows, key.to(self.dtype))
        value_rows.index_copy_(0, plan.rows, value.to(self.dtype))

    def write(self, layer: int, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """slot_mapping: [T] int64 vLLM slots (-1 = padding); key, value: [T, num_kv_heads, head_size]."""
        self.write_planned(layer, self.plan(slot_mapping), key, value)

    def rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> key, value of one layer as [max_slots * block_size, num_kv_heads, head_size] token rows
        (views): slot s's position j is row s * block_size + j."""
        return self._rows[layer]

    def read(self, layer: int, block_ids: torch.Tensor):
        """-> key, value [n, block_size, num_kv_heads, head_size] of blocks that all have slots."""
        slots = self.slot_of_block[block_ids]
        assert (slots >= 0).all(), "reading a block that has no staging slot"
        return self.key[layer, slots], self.value[layer, slots]
