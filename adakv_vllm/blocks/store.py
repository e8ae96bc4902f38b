"""KVStore: the worker-side state of the mixed-precision cache, for every layer. No vLLM import.

    write(layer, slot_mapping, k, v)   new tokens -> FP16 staging (+ their quantization-error features)
    observe_attention(query, ...)      the attention staged tokens receive inside their block
    seal(block_ids, bits)              staging -> packed pages in every layer's KV tensor; slot freed
    gather(layer, block_ids)           K/V of blocks, from pages (sealed) or staging (open)
    release(block_ids)                 staging of blocks that will never seal (partial, freed)

Invariants: a block is sealed iff `sealed[b]`; a sealed block has no staging slot; a write into a
sealed block (vLLM re-allocated the id) re-opens it. Pages are written only by `seal`.

A seal never fails on the values a model wrote: a block whose staged K/V hold a NaN, an inf, or a
row too long to stay within the quantizable range once rotated is sanitised in staging
(`sanitize_staged`) and sealed again, with one warning per request. Stock vLLM caches such values as
they are; a crash here would take down every request of the engine.
"""

from __future__ import annotations

import logging

import torch

from adakv_vllm.blocks.staging import StagingArea, WritePlan
from adakv_vllm.controller.features import QERR_PRECISIONS
from adakv_vllm.kernels import block_attention, cpu, library
from adakv_vllm.kernels.page_codec import PageCodec
from adakv_vllm.quant import format as fmt
from adakv_vllm.quant.reference import MAX_QUANTIZED_ABS, relative_errors

logger = logging.getLogger("vllm.adakv.store")

# A K or V row longer than this (L2) is scaled down to it before sealing: a rotated component never
# exceeds sqrt(2) times the row's norm (rotation.py), which keeps it within MAX_ROTATED_ABS.
MAX_ROW_NORM = MAX_QUANTIZED_ABS / 2


def _relative_errors(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x: [T, H, D] -> [T, len(QERR_PRECISIONS)]: the compiled kernel (built once, on first use),
    else its torch oracle."""
    module = library.load()
    if module is None:
        return relative_errors(x, QERR_PRECISIONS, group_size)
    return cpu.relative_errors(x, QERR_PRECISIONS, group_size, module)


class KVStore:
    def __init__(
        self,
        layout: fmt.PageLayout,
        num_layers: int,
        num_blocks: int,
        dtype: torch.dtype,
        max_staging_slots: int,
        track_attention: bool = False,
    ):
        self.layout, self.num_layers, self.dtype = layout, num_layers, dtype
        self.track_attention = track_attention  # measure what observe_attention measures
        self.codec = PageCodec(layout, dtype)
        h, d = layout.num_kv_heads, layout.record.head_size
        self.staging = StagingArea(num_layers, num_blocks, layout.block_size, h, d, dtype, max_staging_slots)
        self.sealed = torch.zeros(num_blocks, dtype=torch.bool)  # [num_blocks]
        self.pages: list[torch.Tensor | None] = [None] * num_layers  # each [num_blocks, page_bytes] uint8
        self._written: torch.Tensor | None = None  # [T] slots written this step
        self._features: dict[str, torch.Tensor] | None = None
        # this step's slot_mapping (a copy), its plan and the tensor it came in
        self._plan: tuple[torch.Tensor, WritePlan, torch.Tensor] | None = None
        self._located: tuple[torch.Tensor, block_attention.BlockQueries | None] | None = None  # the same
        # Attention token-reads (query x visible key) served from sealed pages vs in all; layer 0.
        self.sealed_reads = 0
        self.total_reads = 0
        self.sanitized_owners: set[str] = set()  # requests whose K/V were sanitised (warned once each)
        self.sealed_total = 0  # blocks sealed since start

    # ---- binding -------------------------------------------------------------------------------
    def bind(self, layer: int, kv_cache: torch.Tensor) -> None:
        """kv_cache: vLLM's uint8 view of this layer, [num_blocks, ...] with contiguous blocks."""
        if self.pages[layer] is not None and self.pages[layer].data_ptr() == kv_cache.data_ptr():
            return
        assert kv_cache.dtype == torch.uint8, kv_cache.dtype
        assert kv_cache[0].numel() == self.layout.page_bytes and kv_cache[0].is_contiguous()
        self.pages[layer] = torch.as_strided(
            kv_cache, (kv_cache.shape[0], self.layout.page_bytes), (kv_cache.stride(0), 1)
        )

    # ---- writes ---------------------------------------------------------------------------------
    def begin_step(self) -> None:
        self._written = None
        self._features = None
        self._plan = None
        self._located = None

    def write(self, layer: int, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """slot_mapping: [T] int64 (-1 = padding); key, value: [T, num_kv_heads, head_size]."""
        # Every layer of a step writes the same slots: plan (allocate, re-open) once per mapping.
        # (the same tensor object in every layer, as vLLM passes it: no comparison needed)
        cached = self._plan
        if cached is None or not (
            cached[2] is slot_mapping
            or (cached[0].shape == slot_mapping.shape and torch.equal(cached[0], slot_mapping))
        ):
            valid = slot_mapping >= 0
            if not valid.any():
                return
            plan = self.staging.plan(slot_mapping)
            self.sealed[slot_mapping[valid] // self.layout.block_size] = False
            cached = self._plan = (slot_mapping.clone(), plan, slot_mapping)
            if self._written is None:
                self._written = slot_mapping[valid].clone()
        self.staging.write_planned(layer, cached[1], key, value)

    @property
    def written_slots(self) -> torch.Tensor | None:
        """[T] int64 vLLM slots written since begin_step (None: none)."""
        return self._written

    def step_features(self) -> dict[str, torch.Tensor] | None:
        """Features of the tokens written this step: slots [T] int64 and qerr [T, NUM_QERR], each
        token's relative reconstruction error at QERR_BITS averaged over layers, heads, K and V.

        Computed once per step from staging for all layers together (per-layer calls cost ~15x more
        in per-op overhead than the arithmetic), by the compiled kernel of kernels/cpu.py where
        it builds (~4x faster than the torch form; benchmarks/feature_cost.py)."""
        if self._written is None:
            return None
        if self._features is None:
            slots = self._written
            bs = self.layout.block_size
            staging_slots = self.staging.slot_of_block[slots // bs]
            key = self.staging.key[:, staging_slots, slots % bs]  # [L, T, H, D]
            value = self.staging.value[:, staging_slots, slots % bs]
            layers, num_tokens = key.shape[:2]
            group = self.layout.record.group_size
            err = _relative_errors(key.flatten(0, 1), group)
            err = err + _relative_errors(value.flatten(0, 1), group)  # [L*T, P]
            self._features = {"slots": slots, "qerr": err.view(layers, num_tokens, -1).mean(0) / 2}
        return self._features

    # ---- attention inside open blocks ---------------------------------------------------------
    def observe_attention(self, query: torch.Tensor, slot_mapping: torch.Tensor, scale: float, layer: int):
        """Accumulate the attention this step's queries ([T, num_heads, head_size]) pay to the staged
        tokens of their own blocks (kernels/block_attention.py), for one layer: by the compiled kernel
        of kernels/cpu.py where it builds, else by its torch oracle. Where the queries sit is
        located once per step (every layer of a step has the same slot mapping). Pure decode steps
        skip this: the fused kernel measures the same from its own scores (attention/backend.py)."""
        staging = self.staging
        cached = self._located
        if cached is None or not (
            cached[0].shape == slot_mapping.shape and torch.equal(cached[0], slot_mapping)
        ):
            where = block_attention.locate(
                staging.slot_of_block, slot_mapping, self.layout.block_size, query.shape[1]
            )
            cached = self._located = (slot_mapping.clone(), where)
        where = cached[1]
        if where is None:
            return
        module = library.load()
        if module is not None:  # the compiled kernel adds into `received` in place
            cpu.block_attention(
                query.to(staging.key.dtype),  # the same dtype in an engine
                staging.key[layer],
                where.rows,
                where.staged,
                where.offset,
                scale,
                staging.received,
                module,
            )
        else:
            staging.received.index_add_(
                0, where.unique, block_attention.attend(query, staging.key[layer], where, scale)
            )
        staging.seen.index_add_(0, where.unique, where.seen)

    def completed_attention(self) -> dict[int, list[float]]:
        """{block id: [block_size] mean attention received} for the blocks this step filled (their
        last token was written, so every query of the block has looked at them)."""
        if self._written is None or not self.track_attention:
            return {}
        bs = self.layout.block_size
        full = self._written[self._written % bs == bs - 1] // bs
        out = {}
        for block in full.tolist():
            slot = int(self.staging.slot_of_block[block])
            if slot >= 0:
                seen = self.staging.seen[slot]
                out[block] = torch.where(seen > 0, self.staging.received[slot] / seen, float("nan")).tolist()
        return out

    # ---- sealing --------------------------------------------------------------------------------
    def seal(
        self,
        block_ids: torch.Tensor,
        key_bits: torch.Tensor,
        value_bits: torch.Tensor,
        owners: list[str] | None = None,
    ) -> list[int]:
        """Pack full open blocks into their pages in every layer.

        block_ids: [n] int64; key_bits, value_bits: [n, block_size]; owners: the request id of each
        block, for warnings. Blocks already sealed are skipped (a prefix-cache block sealed once);
        blocks with no staging were never written here, which the scheduler must not ask for: they
        are skipped with a warning and returned. Returns those unsealed block ids.
        Pages are encoded by the compiled encoder of kernels/cpu.py, from staging straight into
        each layer's rows, where it builds (~8x faster), else by the torch codec (its oracle): the
        same bytes. Values the quantizer cannot store are sanitised first (module docstring).
        """
        staged = self.staging.slot_of_block[block_ids] >= 0
        unstaged = block_ids[~staged & ~self.sealed[block_ids]].tolist()
        if unstaged:
            logger.warning(
                "AdaKV: asked to seal %d blocks that hold no staged tokens (%s); they stay unsealed",
                len(unstaged),
                unstaged[:8],
            )
        open_ = staged & ~self.sealed[block_ids]
        if owners is not None:
            owners = [o for o, keep in zip(owners, open_.tolist(), strict=True) if keep]
        block_ids, key_bits, value_bits = block_ids[open_], key_bits[open_], value_bits[open_]
        if block_ids.numel() == 0:
            return unstaged
        try:
            self._encode(block_ids, key_bits, value_bits)
        except ValueError:  # a NaN / inf / out-of-range value; bits are checked before anything is written
            changed = self.sanitize_staged(block_ids)
            self._warn_sanitized(block_ids, changed, owners)
            self._encode(block_ids, key_bits, value_bits)
        self.sealed[block_ids] = True
        self.sealed_total += int(block_ids.numel())
        self._plan = self._located = None  # they may name the released slots
        self.staging.release(block_ids.tolist())
        return unstaged

    def _encode(self, block_ids: torch.Tensor, key_bits: torch.Tensor, value_bits: torch.Tensor) -> None:
        module = library.load()
        slots = self.staging.slot_of_block[block_ids]
        for layer in range(self.num_layers):
            if module is not None:  # reads staging and writes the page rows in place
                cpu.encode_pages(
                    self.staging.key[layer], self.staging.value[layer], key_bits, value_bits, self.layout,
                    self.dtype, module, slots=slots, clamp=MAX_QUANTIZED_ABS,
                    out=self.pages[layer], block_ids=block_ids,
                )  # fmt: skip
            else:
                key, value = self.staging.read(layer, block_ids)
                key = key.clamp(-MAX_QUANTIZED_ABS, MAX_QUANTIZED_ABS)
                value = value.clamp(-MAX_QUANTIZED_ABS, MAX_QUANTIZED_ABS)
                self.pages[layer][block_ids] = self.codec.encode(key, value, key_bits, value_bits)

    def sanitize_staged(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Make the staged K/V of open `block_ids` ([n] int64) storable, in place, in every layer:
        NaN -> 0, values beyond +-MAX_QUANTIZED_ABS (inf included) -> the bound, and rows longer
        than MAX_ROW_NORM scaled down to it. -> [n] values changed."""
        slots = self.staging.slot_of_block[block_ids]
        changed = torch.zeros(block_ids.numel(), dtype=torch.int64)
        for x in (self.staging.key, self.staging.value):
            raw = x[:, slots].float()  # [L, n, block_size, H, D]
            fixed = raw.nan_to_num(0.0).clamp(-MAX_QUANTIZED_ABS, MAX_QUANTIZED_ABS)
            norm = fixed.norm(dim=-1, keepdim=True)
            fixed = torch.where(norm > MAX_ROW_NORM, fixed * (MAX_ROW_NORM / norm), fixed)
            changed += (fixed != raw).transpose(0, 1).reshape(block_ids.numel(), -1).sum(1)
            x[:, slots] = fixed.to(x.dtype)
        return changed

    def _warn_sanitized(self, block_ids: torch.Tensor, changed: torch.Tensor, owners: list[str] | None):
        for i in changed.nonzero().squeeze(1).tolist():
            owner = owners[i] if owners is not None else "?"
            if owner in self.sanitized_owners:
                continue
            self.sanitized_owners.add(owner)
            logger.warning(
                "AdaKV: request %s wrote %d K/V values that cannot be cached as they are (NaN, inf, or "
                "beyond +-%g) into block %d; stored sanitised (NaN -> 0, clamped, over-long rows scaled "
                "to norm %g). Further blocks of this request are sanitised silently.",
                owner,
                int(changed[i]),
                MAX_QUANTIZED_ABS,
                int(block_ids[i]),
                MAX_ROW_NORM,
            )

    def release(self, block_ids) -> None:
        self._plan = self._located = None  # they may name the released slots
        self.staging.release(block_ids)

    # ---- reads ----------------------------------------------------------------------------------
    def gather(self, layer: int, block_ids: torch.Tensor):
        """block_ids: [n] int64 -> key, value [n, block_size, num_kv_heads, head_size] in the model dtype.

        Sealed blocks are decoded by the compiled page decoder of kernels/cpu.py, straight into their
        rows, where it builds, else by the torch codec (its oracle): the same bits. Open blocks are
        copied from staging."""
        n, bs = block_ids.numel(), self.layout.block_size
        h, d = self.layout.num_kv_heads, self.layout.record.head_size
        key = torch.empty(n, bs, h, d, dtype=self.dtype)
        value = torch.empty_like(key)
        sealed = self.sealed[block_ids]
        rows = sealed.nonzero().squeeze(1)  # [s] rows of key/value that sealed blocks fill
        if rows.numel():
            module = library.load()
            if module is not None:
                cpu.decode_pages(
                    self.pages[layer], block_ids[rows], self.layout, self.dtype, module,
                    out_key=key, out_value=value, out_rows=rows,
                )  # fmt: skip
            else:
                k, v, _, _ = self.codec.decode(self.pages[layer][block_ids[rows]])
                key[rows], value[rows] = k.to(self.dtype), v.to(self.dtype)
        if rows.numel() < n:
            open_ = (~sealed).nonzero().squeeze(1)
            key[open_], value[open_] = self.staging.read(layer, block_ids[open_])
        return key, value

    def count_reads(
        self, query_lens: torch.Tensor, seq_lens: torch.Tensor, sealed_tokens: torch.Tensor
    ) -> None:
        """Account one layer's reads. All tensors [num_reqs]; sealed blocks precede every query."""
        q, s = query_lens.to(torch.int64), seq_lens.to(torch.int64)
        # a query at position p reads p+1 tokens; positions run from s-q to s-1
        self.total_reads += int((q * (s - q) + q * (q + 1) // 2).sum())
        self.sealed_reads += int((q * sealed_tokens.to(torch.int64)).sum())

    def bits(self, block_ids: torch.Tensor):
        """The bit map of sealed blocks, read back from layer 0's pages: -> key_bits, value_bits [n, bs]."""
        return fmt.decode_bit_map(self.pages[0][block_ids], self.layout.block_size)
