"""FP16 staging: the exact K/V of blocks that are not sealed yet, keyed by vLLM block id.

A block's tokens are written here as the model computes them; when the block is full the scheduler
decides the bits and the worker packs the page, then releases the slot. Staging is shared by all
requests (keyed by block id), so a prefix-cache hit on a block written in the same step finds it.

Slots come in chunks allocated on demand up to `max_slots`, so memory follows the real number of
open blocks; the worst case (`max_slots`) is what the capacity figures charge.

Invariant: `slot_of_block[b] >= 0` iff block b has a slot; a slot belongs to at most one block.
"""

from __future__ import annotations

import dataclasses

import torch


class StagingFullError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class WritePlan:
    valid: torch.Tensor | None  # [T] bool, the non-padding tokens; None: all of them
    rows: torch.Tensor  # [V] int64, each valid token's row in a layer's [slots * block_size] view


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
        chunk_slots: int = 64,
    ):
        self.num_layers, self.block_size = num_layers, block_size
        self.num_kv_heads, self.head_size, self.dtype = num_kv_heads, head_size, dtype
        self.max_slots, self.chunk_slots = max_slots, chunk_slots
        # key/value: [num_layers, capacity, block_size, num_kv_heads, head_size]; grows by chunks.
        self.key = torch.empty(num_layers, 0, block_size, num_kv_heads, head_size, dtype=dtype)
        self.value = torch.empty_like(self.key)
        self.slot_of_block = torch.full((num_blocks,), -1, dtype=torch.int64)  # [num_blocks]
        self._free: list[int] = []
        # attention each staged token received inside its block, summed over layers, heads and
        # queries, and how many (layer, head, query) rows could see it: [capacity, block_size] fp32
        self.received = torch.zeros(0, block_size)
        self.seen = torch.zeros(0, block_size)

    @staticmethod
    def slot_bytes(
        num_layers: int, block_size: int, num_kv_heads: int, head_size: int, elem_bytes: int
    ) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_size * elem_bytes

    @property
    def capacity(self) -> int:
        return self.key.shape[1]

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    def _grow(self) -> None:
        old, new = self.capacity, min(self.capacity + self.chunk_slots, self.max_slots)
        if new == old:
            raise StagingFullError(f"all {self.max_slots} FP16 staging slots are in use")
        shape = (self.num_layers, new - old, *self.key.shape[2:])
        self.key = torch.cat([self.key, torch.zeros(shape, dtype=self.dtype)], dim=1)
        self.value = torch.cat([self.value, torch.zeros(shape, dtype=self.dtype)], dim=1)
        self.received = torch.cat([self.received, torch.zeros(new - old, self.block_size)])
        self.seen = torch.cat([self.seen, torch.zeros(new - old, self.block_size)])
        self._free.extend(range(new - 1, old - 1, -1))

    def assign(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Slots for `block_ids` ([n] int64), allocating for blocks without one. -> [n] int64."""
        missing = block_ids[self.slot_of_block[block_ids] < 0].unique().tolist()
        for block in missing:
            if not self._free:
                self._grow()
            slot = self._free.pop()
            self.slot_of_block[block] = slot
            self.received[slot] = 0.0
            self.seen[slot] = 0.0
        return self.slot_of_block[block_ids]

    def release(self, block_ids) -> None:
        for block in block_ids:
            slot = int(self.slot_of_block[block])
            if slot >= 0:
                self._free.append(slot)
                self.slot_of_block[block] = -1

    def plan(self, slot_mapping: torch.Tensor) -> WritePlan:
        """Where the tokens of `slot_mapping` ([T] int64 vLLM slots, -1 = padding) go, allocating
        slots for blocks that have none. Every layer of a step writes the same slots: plan once."""
        valid = slot_mapping >= 0
        everything = bool(valid.all())
        slots = slot_mapping if everything else slot_mapping[valid]
        blocks, offsets = slots // self.block_size, slots % self.block_size
        rows = self.assign(blocks) * self.block_size + offsets
        return WritePlan(None if everything else valid, rows)

    def write_planned(self, layer: int, plan: WritePlan, key: torch.Tensor, value: torch.Tensor) -> None:
        """key, value: [T, num_kv_heads, head_size], the rows of the planned slot_mapping."""
        if plan.valid is not None:
            key, value = key[plan.valid], value[plan.valid]
        shape = (-1, self.num_kv_heads, self.head_size)
        self.key[layer].view(shape).index_copy_(0, plan.rows, key.to(self.dtype))
        self.value[layer].view(shape).index_copy_(0, plan.rows, value.to(self.dtype))

    def write(self, layer: int, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """slot_mapping: [T] int64 vLLM slots (-1 = padding); key, value: [T, num_kv_heads, head_size]."""
        self.write_planned(layer, self.plan(slot_mapping), key, value)

    def read(self, layer: int, block_ids: torch.Tensor):
        """-> key, value [n, block_size, num_kv_heads, head_size] of blocks that all have slots."""
        slots = self.slot_of_block[block_ids]
        assert (slots >= 0).all(), "reading a block that has no staging slot"
        return self.key[layer, slots], self.value[layer, slots]
