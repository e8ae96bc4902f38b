"""AdaKVScheduler: vLLM's scheduler plus the controller hook that decides the bits of sealing pages.

Each step:
    schedule()
      1. before vLLM schedules: every block that became full in earlier steps (of running requests,
         and of requests freed since) and is not sealed yet is a seal candidate
      2. super().schedule() -- blocks allocated now are fresh ids: drop them from candidates and
         from the sealed set (the worker re-opens a block on its first write)
      3. policy scores -> planner bits per token under the page budget; attach to SchedulerOutput
         as `adakv_seal = (block_ids [n] int64, bits [n, block_size] int64)` and
         `adakv_release = [block ids]` (partial blocks of freed requests: they never seal)
    update_from_output()
      store the worker's per-token features (quantization error by slot, sampled-token entropy)

Prefix-caching rule: a block is sealed once, by the first step after it is full, whoever wrote it;
requests that hit it later read that page. Bits are a deterministic function of the block's tokens,
positions and writer-reported features, which are themselves functions of the prefix, so the same
prefix gets the same bits on any server.
"""

from __future__ import annotations

import collections
import logging

import torch
from vllm.v1.core.sched.scheduler import Scheduler

from adakv_vllm.attention import runtime
from adakv_vllm.blocks import planner
from adakv_vllm.blocks import spec as spec_glue
from adakv_vllm.config import from_vllm_config
from adakv_vllm.controller.policy import BlockTokens, controller_expectations, make_policy, resolve
from adakv_vllm.quant.precision import PRECISIONS

logger = logging.getLogger("vllm.adakv")

NUM_QERR = 3  # features: relative error at 2, 4, 8 bits


class AdaKVScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.adakv = from_vllm_config(self.vllm_config)
        if self.adakv is None:
            raise RuntimeError("AdaKVScheduler started without the AdaKV plugin being asked for")
        runtime.set_config(self.adakv)
        group = self.kv_cache_config.kv_cache_groups[0]
        self.layout = spec_glue.layout_of_spec(group.kv_cache_spec, self.adakv)
        self.num_layers = len(group.layer_names)
        vocab_size = self.vllm_config.model_config.get_vocab_size()
        self.policy_name = resolve(self.adakv.policy, vocab_size, self.adakv.controller_weights)
        learned = {}
        if self.policy_name == "learned":
            learned = dict(
                vocab_size=vocab_size,
                weights=self.adakv.controller_weights,
                expect=controller_expectations(self.adakv.group_size, self.adakv.rotate_keys),
            )
        self.policy = make_policy(
            self.policy_name, self.adakv.target_bits, self.adakv.seed, self.adakv.sink_tokens, **learned
        )
        heads = self.layout.num_kv_heads
        # bytes one token costs in a page at each precision (K and V records of every head)
        self.token_cost = torch.tensor([2 * heads * self.layout.record.record_bytes(p) for p in PRECISIONS])
        self.page_budget = self.layout.page_bytes - self.layout.header_bytes
        self.prefix_caching = bool(self.cache_config.enable_prefix_caching)
        self._sealed: set[int] = set()
        self._qerr: dict[int, torch.Tensor] = {}  # block id -> [block_size, 3]
        # block id -> (token ids up to the block's end, first position, sampled-token features)
        self._freed_full: dict[int, tuple[list[int], int, dict]] = {}
        # request id -> {position: (entropy, probability)} of its sampled tokens not yet sealed
        self._sampled: dict[str, dict[int, tuple[float, float]]] = {}
        self._freed_partial: list[int] = []
        self.bits_histogram = torch.zeros(len(PRECISIONS), dtype=torch.int64)
        self._log_startup()

    # ---- startup -----------------------------------------------------------------------------
    def capacity_report(self) -> dict[str, float]:
        """KV capacity in tokens, next to what bf16 pages would hold in the same memory."""
        kv_bytes = self.kv_cache_config.num_blocks * self.layout.page_bytes * self.num_layers
        bf16_token = (
            2 * self.num_layers * self.layout.num_kv_heads * self.layout.record.record_bytes(PRECISIONS[-1])
        )
        tokens = self.kv_cache_config.num_blocks * self.layout.block_size
        return {
            "tokens": tokens,
            "bf16_tokens": kv_bytes // bf16_token,
            "kv_mib": kv_bytes / 2**20,
            "ratio": tokens / max(1, kv_bytes // bf16_token),
        }

    def _log_startup(self) -> None:
        cap = self.capacity_report()
        logger.info(
            "AdaKV active: %s (policy in use: %s); page %d bytes (block_size %d, %d KV heads, "
            "head_size %d); KV capacity %d tokens vs %d at bf16 in the same %.1f MiB (%.2fx)",
            self.adakv.describe(),
            self.policy_name,
            self.layout.page_bytes,
            self.layout.block_size,
            self.layout.num_kv_heads,
            self.layout.record.head_size,
            cap["tokens"],
            cap["bf16_tokens"],
            cap["kv_mib"],
            cap["ratio"],
        )

    # ---- step --------------------------------------------------------------------------------
    def schedule(self, *args, **kwargs):
        bs = self.layout.block_size
        candidates = {b: v for b, v in self._freed_full.items() if b not in self._sealed}
        self._freed_full = {}
        for request in self.running:
            block_ids = self.kv_cache_manager.get_block_ids(request.request_id)[0]
            tokens = request.all_token_ids
            for i in range(min(request.num_computed_tokens // bs, len(block_ids))):
                block = block_ids[i]
                if block not in self._sealed and block not in candidates:
                    sampled = self._sampled.setdefault(request.request_id, {})
                    candidates[block] = (list(tokens[: (i + 1) * bs]), i * bs, sampled)

        output = super().schedule(*args, **kwargs)

        for block in self._newly_allocated(output):
            # A fresh id: whatever it held before (sealed page, pending seal of a request freed
            # inside this very schedule() call) is gone; the new owner's writes re-open it.
            self._sealed.discard(block)
            self._qerr.pop(block, None)
            candidates.pop(block, None)
            self._freed_full.pop(block, None)
        output.adakv_release, self._freed_partial = self._freed_partial, []
        output.adakv_seal = self._plan(candidates) if candidates else None
        return output

    def _newly_allocated(self, output) -> set[int]:
        """Block ids handed out by this step's allocation (prefix-cache hits excluded)."""
        bs = self.layout.block_size
        fresh: set[int] = set()
        for new in output.scheduled_new_reqs:
            fresh.update(new.block_ids[0][new.num_computed_tokens // bs :])
        cached = output.scheduled_cached_reqs
        for req_id, block_ids, num_computed in zip(
            cached.req_ids, cached.new_block_ids, cached.num_computed_tokens, strict=True
        ):
            if block_ids is None:
                continue
            if req_id in cached.resumed_req_ids:
                # A resumed request lists all its blocks; the leading ones are prefix-cache hits.
                fresh.update(block_ids[0][num_computed // bs :])
            else:
                fresh.update(block_ids[0])
        return fresh

    def _plan(self, candidates: dict[int, tuple[list[int], int, dict]]):
        bs = self.layout.block_size
        block_ids = sorted(candidates)
        bits = torch.empty(len(block_ids), bs, dtype=torch.int64)
        for row, block in enumerate(block_ids):
            prefix, start, sampled = candidates[block]
            if self.adakv.target_bits >= PRECISIONS[-1].bits:
                bits[row] = PRECISIONS[-1].bits  # every policy stores FP16 at 16 bits
            else:
                tokens = self._block_tokens(block, prefix, start, sampled)
                weight, distortion = self.policy.scores(tokens)
                floor = self.policy.floor(tokens)
                bits[row] = planner.allocate(weight, distortion, self.token_cost, self.page_budget, floor)
            self._sealed.add(block)
            self._qerr.pop(block, None)
            for position in range(start, start + bs):
                sampled.pop(position, None)
        for i, p in enumerate(PRECISIONS):
            self.bits_histogram[i] += int((bits == p.bits).sum())
        return torch.tensor(block_ids, dtype=torch.int64), bits

    def _block_tokens(self, block: int, prefix: list[int], start: int, sampled: dict) -> BlockTokens:
        """prefix: the sequence's tokens up to the end of this block; start: its first position;
        sampled: {position: (entropy, probability)} of the sequence's sampled tokens."""
        bs = self.layout.block_size
        seen = collections.Counter(prefix[:start])
        prior = []
        for token in prefix[start:]:
            prior.append(seen[token])
            seen[token] += 1
        prior_count = torch.tensor(prior, dtype=torch.int64)
        qerr = self._qerr.get(block)
        return BlockTokens(
            token_ids=torch.tensor(prefix[start:], dtype=torch.int64),
            positions=torch.arange(start, start + bs),
            qerr=qerr if qerr is not None else torch.full((bs, NUM_QERR), float("nan")),
            first_occurrence=prior_count == 0,
            prior_count=prior_count,
            sampled=torch.tensor([sampled.get(p, (float("nan"),) * 2) for p in range(start, start + bs)]),
        )

    # ---- features and freeing ----------------------------------------------------------------
    def update_from_output(self, scheduler_output, model_runner_output):
        features = getattr(model_runner_output, "adakv_features", None)
        if features is not None and features.get("slots") is not None:
            self._store_qerr(features["slots"], features["qerr"])
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req_id, values in (features or {}).get("sampled", {}).items():
            request = self.requests.get(req_id)
            if request is not None:  # its sampled token is the last one, written next step
                self._sampled.setdefault(req_id, {})[request.num_tokens - 1] = values
        for req_id, (positions, entropy, prob) in (features or {}).get("prompt", {}).items():
            if req_id in self.requests:
                table = self._sampled.setdefault(req_id, {})
                table.update(zip(positions, zip(entropy, prob, strict=True), strict=True))
        return outputs

    def _store_qerr(self, slots: torch.Tensor, qerr: torch.Tensor) -> None:
        bs = self.layout.block_size
        blocks, offsets = (slots // bs).tolist(), (slots % bs).tolist()
        for block, offset, row in zip(blocks, offsets, qerr, strict=True):
            table = self._qerr.get(block)
            if table is None:
                table = self._qerr[block] = torch.full((bs, NUM_QERR), float("nan"))
            table[offset] = row

    def _free_request_blocks(self, request) -> None:
        bs = self.layout.block_size
        block_ids = self.kv_cache_manager.get_block_ids(request.request_id)[0]
        num_full = min(request.num_computed_tokens // bs, len(block_ids))
        tokens = request.all_token_ids
        sampled = self._sampled.pop(request.request_id, {})
        for i, block in enumerate(block_ids):
            if i < num_full and self.prefix_caching:
                # Full blocks stay in vLLM's prefix cache: they must still be sealed.
                if block not in self._sealed:
                    self._freed_full[block] = (list(tokens[: (i + 1) * bs]), i * bs, sampled)
            elif block not in self._sealed:
                self._freed_partial.append(block)
        super()._free_request_blocks(request)
