"""Test-only fault injection: poison one request's cached K/V, to prove a bad request cannot take the
engine down (tests/e2e/test_faults.py, `make soak`). Off unless ADAKV_TEST_POISON_TOKEN is set.

With ADAKV_TEST_POISON_TOKEN=<token id>, every request whose *prompt* contains that token id gets NaN
written into its staged key and value at the token's first position, in every layer, right after
the forward that cached it. From the next step on its attention reads the NaN (its own output turns
to garbage, as a model overflow would make it), and its block must still seal. Other requests are
untouched: their tokens live in other blocks.
"""

from __future__ import annotations

import logging

from adakv_vllm import envs

logger = logging.getLogger("vllm.adakv.faults")


class FaultInjector:
    def __init__(self, token_id: int, block_size: int):
        self.token_id, self.block_size = token_id, block_size
        self._pending: dict[str, int] = {}  # request id -> vLLM slot to poison once it is written

    @classmethod
    def from_env(cls, block_size: int) -> FaultInjector | None:
        token = envs.test_poison_token()
        if token is None:
            return None
        logger.warning("AdaKV fault injection is ON: prompts containing token %d get NaN K/V", token)
        return cls(token, block_size)

    def after_forward(self, scheduler_output, store) -> None:
        for new in scheduler_output.scheduled_new_reqs:
            prompt = list(new.prompt_token_ids or [])
            if self.token_id in prompt:
                position = prompt.index(self.token_id)
                block = new.block_ids[0][position // self.block_size]
                self._pending[new.req_id] = block * self.block_size + position % self.block_size
        if not self._pending or store.written_slots is None:
            return
        written = set(store.written_slots.tolist())
        for req_id, slot in list(self._pending.items()):
            if slot in written:
                staging_slot = int(store.staging.slot_of_block[slot // self.block_size])
                store.staging.key[:, staging_slot, slot % self.block_size] = float("nan")
                store.staging.value[:, staging_slot, slot % self.block_size] = float("nan")
                del self._pending[req_id]
                logger.warning(
                    "AdaKV fault injection: NaN K/V written for request %s (slot %d)", req_id, slot
                )
