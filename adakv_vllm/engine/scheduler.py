"""AdaKVScheduler: vLLM's scheduler plus the controller hook that decides the bits of sealing pages.

Each step:
    schedule()
      1. before vLLM schedules: every block that became full in earlier steps (of running requests,
         and of requests freed since) and is not sealed yet is a seal candidate
      2. super().schedule() -- blocks allocated now are fresh ids: drop them from candidates and
         from the sealed set (the worker re-opens a block on its first write)
      3. policy scores -> planner bits per token under the page budget; attach to SchedulerOutput
         as `adakv_seal = SealList(block_ids [n] int64, bits [n, block_size] int64, owners)` and
         `adakv_release = [block ids]` (partial blocks of freed requests: they never seal)
    update_from_output()
      store the worker's per-token features (quantization error by slot, sampled-token entropy)
The per-block bookkeeping (sealed blocks, pending features, freed blocks) is engine/seal_book.py.

Prefix-caching rule: a block is sealed once, by the first step after it is full, whoever wrote it;
requests that hit it later read that page. Bits are a deterministic function of the block's tokens,
positions and writer-reported features, which are themselves functions of the prefix, so the same
prefix gets the same bits on any server.
"""

from __future__ import annotations

import logging

import torch
from vllm.v1.core.sched.scheduler import Scheduler

from adakv_vllm.attention import runtime
from adakv_vllm.blocks import planner
from adakv_vllm.blocks import spec as spec_glue
from adakv_vllm.blocks.staging import step_limits
from adakv_vllm.config import from_vllm_config
from adakv_vllm.controller.policy import PARTS, policy_for
from adakv_vllm.engine import staging_budget
from adakv_vllm.engine.seal_book import Candidate, SealBook, SealList
from adakv_vllm.quant.precision import PRECISIONS

logger = logging.getLogger("vllm.adakv")


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
        self.policy, self.policy_reason = policy_for(
            self.adakv, self.vllm_config.model_config.get_vocab_size(), self.layout.record.group_size
        )
        self.policy_name = self.policy.name
        # keys and values are planned apart, each within its share of the page
        self.targets = self.adakv.key_value_bits()
        self.token_cost = self.layout.token_costs()  # [P] bytes of one token's K (or V), all heads
        self.budgets = self.layout.part_budgets(*self.targets)
        self.prefix_caching = bool(self.cache_config.enable_prefix_caching)
        self.book = SealBook(self.layout.block_size)
        # FP16 staging is scheduled like KV blocks: every step's writes must fit the reserve
        self.staging_slots = staging_budget.for_kv_cache(self.vllm_config, self.adakv, self.kv_cache_config)
        self._configured_limits = (self.max_num_scheduled_tokens, self.max_num_active_reqs)
        # tokens sealed at each precision: [2 (keys, values), len(PRECISIONS)]
        self.bits_histogram = torch.zeros(len(PARTS), len(PRECISIONS), dtype=torch.int64)
        self._log_startup()

    # ---- startup -----------------------------------------------------------------------------
    def capacity_report(self) -> dict[str, float]:
        """KV capacity in tokens, next to what bf16 would hold in the same memory: the pages AND the
        FP16 staging reserve, which stock vLLM would have spent on bf16 blocks."""
        kv_bytes = self.kv_cache_config.num_blocks * self.layout.page_bytes * self.num_layers
        staging_bytes = self.staging_slots * staging_budget.slot_bytes(self.vllm_config)
        bf16_token = (
            2 * self.num_layers * self.layout.num_kv_heads * self.layout.record.record_bytes(PRECISIONS[-1])
        )
        tokens = self.kv_cache_config.num_blocks * self.layout.block_size
        bf16_tokens = (kv_bytes + staging_bytes) // bf16_token
        return {
            "tokens": tokens,
            "bf16_tokens": bf16_tokens,
            "kv_mib": kv_bytes / 2**20,
            "staging_mib": staging_bytes / 2**20,
            "staging_slots": self.staging_slots,
            "ratio": tokens / max(1, bf16_tokens),
        }

    def page_capacity(self) -> dict[str, float]:
        """The format alone: bf16 bytes of one cached token / page bytes of one cached token (bit
        map, scales and page padding included), and the effective bits per element that means."""
        bf16 = 2 * self.layout.num_kv_heads * self.layout.record.record_bytes(PRECISIONS[-1])
        ratio = bf16 / (self.layout.page_bytes / self.layout.block_size)
        return {"ratio": ratio, "bits_per_element": 16 / ratio}

    def _log_startup(self) -> None:
        cap, page = self.capacity_report(), self.page_capacity()
        logger.info(
            "AdaKV active: %s (policy in use: %s -- %s); keys %.2f / values %.2f code bits; page %d "
            "bytes (block_size %d, %d KV heads, head_size %d, group_size %d) = %.2f bits per element "
            "with scales and bit map, %.2fx the tokens of bf16 per byte; FP16 staging %d slots "
            "(%.1f MiB); KV capacity %d tokens vs %d at bf16 in the same %.1f MiB (%.2fx)",
            self.adakv.describe(),
            self.policy_name,
            self.policy_reason,
            *self.targets,
            self.layout.page_bytes,
            self.layout.block_size,
            self.layout.num_kv_heads,
            self.layout.record.head_size,
            self.layout.record.group_size,
            page["bits_per_element"],
            page["ratio"],
            cap["staging_slots"],
            cap["staging_mib"],
            cap["tokens"],
            cap["bf16_tokens"],
            cap["kv_mib"] + cap["staging_mib"],
            cap["ratio"],
        )

    # ---- step --------------------------------------------------------------------------------
    def schedule(self, *args, **kwargs):
        self._fit_staging()
        book = self.book
        candidates = book.take_freed_full()
        for request in self.running:
            block_ids = self.kv_cache_manager.get_block_ids(request.request_id)[0]
            found = book.collect(
                request.request_id, block_ids, request.num_computed_tokens, request.all_token_ids
            )
            for block, candidate in found.items():
                candidates.setdefault(block, candidate)

        output = super().schedule(*args, **kwargs)

        for block in self._newly_allocated(output):
            # A fresh id: whatever it held before (sealed page, pending seal of a request freed
            # inside this very schedule() call) is gone; the new owner's writes re-open it.
            book.forget(block)
            candidates.pop(block, None)
        for block, candidate in book.take_freed_full().items():  # freed inside this schedule() call
            candidates.setdefault(block, candidate)
        output.adakv_release = book.take_releases()
        output.adakv_seal = self._plan(candidates) if candidates else None
        return output

    def has_requests(self) -> bool:
        """Also true while freed requests' blocks wait to be sealed or released: one more (empty)
        step hands them to the worker, so an idle engine holds no staging."""
        return super().has_requests() or self.book.has_pending()

    def _fit_staging(self) -> None:
        """Cap this step's token budget and admissions so its writes fit the staging reserve
        (blocks/staging.step_limits); vLLM reads both limits afresh in every schedule()."""
        max_tokens, max_active = self._configured_limits
        prefilling = sum(1 for r in self.running if r.num_computed_tokens < r.num_tokens - 1)
        # no more admissions than requests wait: the slots they would hold back go to the chunks
        # (one 4096-token prompt is then prefilled in one step, as stock does, not in two)
        _, waiting = self.get_request_counts()
        tokens, admit = step_limits(
            self.staging_slots,
            len(self.running),
            prefilling,
            self.layout.block_size,
            max_tokens,
            max(0, min(max_active - len(self.running), waiting)),
        )
        self.max_num_scheduled_tokens = tokens
        self.max_num_active_reqs = len(self.running) + admit

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

    def _plan(self, candidates: dict[int, Candidate]) -> SealList:
        bs = self.layout.block_size
        block_ids = sorted(candidates)
        tokens = [self.book.block_tokens(block, candidates[block]) for block in block_ids]
        bits = torch.empty(len(PARTS), len(block_ids), bs, dtype=torch.int64)  # keys, values
        for i, part in enumerate(PARTS):
            if self.targets[i] >= PRECISIONS[-1].bits:
                bits[i] = PRECISIONS[-1].bits  # every policy stores FP16 at 16 bits
                continue
            weight, distortion = self.policy.scores_many(tokens, part)
            floors = [self.policy.floor(block, part) for block in tokens]
            floor = None
            if any(f is not None for f in floors):
                lowest = torch.full((bs,), PRECISIONS[0].bits)
                floor = torch.stack([lowest if f is None else f for f in floors])
            bits[i] = planner.allocate_pages(weight, distortion, self.token_cost, self.budgets[i], floor)
        for block in block_ids:
            self.book.mark_sealed(block, candidates[block])
        self._count_bits(bits, +1)
        owners = [candidates[b].request_id for b in block_ids]
        return SealList(torch.tensor(block_ids, dtype=torch.int64), bits[0], bits[1], owners)

    def _count_bits(self, bits: torch.Tensor, sign: int) -> None:
        """bits: [2, n, block_size] keys, values -> bits_histogram [2, len(PRECISIONS)]."""
        for j, p in enumerate(PRECISIONS):
            self.bits_histogram[:, j] += sign * (bits == p.bits).flatten(1).sum(1)

    # ---- features and freeing ----------------------------------------------------------------
    def update_from_output(self, scheduler_output, model_runner_output):
        features = getattr(model_runner_output, "adakv_features", None) or {}
        if features.get("slots") is not None:
            self.book.store_qerr(features["slots"], features["qerr"])
        self.book.store_attention(features.get("attention") or {})
        self._unseal(scheduler_output, features.get("unsealed") or [])
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req_id, values in features.get("sampled", {}).items():
            request = self.requests.get(req_id)
            if request is not None:  # its sampled token is the last one, written next step
                self.book.record_sampled(req_id, [request.num_tokens - 1], [values])
        for req_id, (positions, entropy, prob) in features.get("prompt", {}).items():
            if req_id in self.requests:
                self.book.record_sampled(req_id, positions, list(zip(entropy, prob, strict=True)))
        return outputs

    def _unseal(self, scheduler_output, unsealed: list[int]) -> None:
        """The worker could not seal these blocks of this step's seal list (nothing staged): they
        are not sealed, and their bits never counted."""
        seal = getattr(scheduler_output, "adakv_seal", None)
        if not unsealed or seal is None:
            return
        rows = [i for i, b in enumerate(seal.block_ids.tolist()) if b in set(unsealed)]
        self._count_bits(torch.stack([seal.key_bits[rows], seal.value_bits[rows]]), -1)
        for block in unsealed:
            self.book.sealed.discard(block)

    def _free_request_blocks(self, request) -> None:
        block_ids = self.kv_cache_manager.get_block_ids(request.request_id)[0]
        num_full = min(request.num_computed_tokens // self.layout.block_size, len(block_ids))
        self.book.free_request(
            request.request_id, block_ids, num_full, request.all_token_ids, keep_full=self.prefix_caching
        )
        super()._free_request_blocks(request)
