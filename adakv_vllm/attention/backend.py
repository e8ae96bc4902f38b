"""AdaKVAttentionBackend: vLLM's CUSTOM attention slot, reading heterogeneous uint8 pages.

Writes go to FP16 staging (`do_kv_cache_update`). Reads take one of two paths, chosen per sequence:
  fused    decode rows (query_len == 1): the C++ kernel of kernels/cpu.py reads the packed
           pages and staging in place (ADAKV_CPU_ATTENTION=auto|fused).
  scratch  prefill rows (query_len > 1: prefill, chunked prefill), or every row with
           ADAKV_CPU_ATTENTION=scratch: gather the blocks those sequences need -- sealed pages
           decoded, open blocks from staging -- into a small bf16 scratch cache laid out like stock
           CPU_ATTN's (in 128-token blocks, stock's default, each holding several pages), and run
           vLLM's own CPU attention kernel over it with a remapped block table
           (its GEMM-shaped tiles are ~2x faster than the fused kernel on prefill). At 16 bits the
           scratch holds exactly the bytes stock vLLM would have cached, so outputs match stock.
A mixed step splits the batch: decode rows always take the fused kernel, whose work split depends
on each sequence alone, so a request decodes the same tokens whatever else shares its steps (the
two paths round differently: scratch stores bf16 K/V and bf16 probabilities, fused keeps fp32).
Both paths fill `output[:num_actual_tokens]` ([num_tokens, num_heads, head_size], the query dtype),
as stock CPU_ATTN does, and layer 0 accounts the step's sealed/total token reads.
The `attention` policy's in-block measurement (kernels/block_attention.py): a pure decode step takes
it from the fused kernel's own scores (no second pass over the staged keys); other steps call
KVStore.observe_attention for all their rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

import torch
from vllm import _custom_ops as ops
from vllm import envs as vllm_envs
from vllm.v1.attention.backend import AttentionType, MultipleOf
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from adakv_vllm import envs
from adakv_vllm.attention import runtime
from adakv_vllm.blocks import spec as spec_glue
from adakv_vllm.kernels import cpu as cpu_ops
from adakv_vllm.kernels import library

logger = logging.getLogger("vllm.adakv.cpu")


class AdaKVAttentionBackend(CPUAttentionBackend):
    forward_includes_kv_cache_update = False
    supported_kv_cache_dtypes = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # the static AttentionBackendEnum slot; a dynamic member breaks in EngineCore

    @staticmethod
    def get_impl_cls() -> type[AdaKVAttentionImpl]:
        return AdaKVAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[CPUAttentionMetadataBuilder]:
        return CPUAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        # A page is one manager block: never let vLLM split it into kernel blocks.
        return [MultipleOf(1)]

    @classmethod
    def customize_spec(cls, spec):
        return spec_glue.customize(spec, runtime.config())


class AdaKVAttentionImpl(CPUAttentionBackendImpl):
    _layer_index: int | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The fused kernel implements plain causal decoder attention only.
        plain = (
            self.attn_type == AttentionType.DECODER
            and self.sliding_window == -1
            and self.alibi_slopes is None
            and not self.logits_soft_cap
            and self.sinks is None
        )
        # Resolved (and JIT-built on first use on this machine) now, not in the first decode step.
        self._fused = library.fused_kernel() if plain else None

    def _index(self, layer) -> int:
        if self._layer_index is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self._layer_index = extract_layer_index(layer.layer_name)
        return self._layer_index

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        # key, value: [T, num_kv_heads, head_size]; slot_mapping: [T] (-1 = padding)
        store = runtime.store()
        index = self._index(layer)
        store.bind(index, kv_cache)
        store.write(index, slot_mapping, key, value)

    def forward(
        self,
        layer,
        query,
        key,
        value,
        kv_cache,
        attn_metadata: CPUAttentionMetadata | None,
        output,
        output_scale=None,
        output_block_scale=None,
    ):
        if attn_metadata is None:  # profile / warm-up runs
            return output
        store = runtime.store()
        index = self._index(layer)
        store.bind(index, kv_cache)
        if index == 0:
            count_reads(store, attn_metadata)
        pure_decode = self._fused is not None and attn_metadata.max_query_len == 1
        if store.track_attention and not pure_decode:  # a pure decode step measures in the kernel
            n = attn_metadata.num_actual_tokens
            store.observe_attention(query[:n], attn_metadata.slot_mapping[:n], self.scale, index)
        if self._fused is None:
            return self._scratch_forward(layer, store, index, query, key, value, attn_metadata, output)
        if pure_decode:
            measure = store.track_attention
            return fused_decode(self._fused, store, index, query, attn_metadata, self.scale, output, measure)
        split = split_step(
            attn_metadata, self.num_heads, self.num_kv_heads, self.head_size, query.dtype, layer.isa
        )
        if split.decode is None:
            return self._scratch_forward(layer, store, index, query, key, value, attn_metadata, output)
        rows = split.decode_rows
        with _rows_of(output, rows) as out:
            fused_decode(self._fused, store, index, query[rows], split.decode, self.scale, out)
        rows = split.prefill_rows
        with _rows_of(output, rows) as out:
            self._scratch_forward(
                layer, store, index, query[rows], key[rows], value[rows], split.prefill, out
            )
        return output

    def _scratch_forward(self, layer, store, index: int, query, key, value, md, output):
        scratch, block_table = gather_scratch(store, index, md, layer.isa)
        metadata = dataclasses.replace(md, block_table=block_table)
        return super().forward(layer, query, key, value, scratch, metadata, output)


@contextlib.contextmanager
def _rows_of(output: torch.Tensor, rows: slice | torch.Tensor):
    """A part's output rows to fill: a view of `output` where they are a slice, else a new tensor
    scattered into `output` on exit."""
    if isinstance(rows, slice):
        yield output[rows]
        return
    out = output.new_empty((rows.numel(), *output.shape[1:]))
    yield out
    output[rows] = out


def fused_decode(
    kernel, store, layer: int, query, md: CPUAttentionMetadata, scale: float, output, measure: bool = False
):
    """query, output: [num_tokens, num_heads, head_size]; fills output[:num_actual_tokens].
    measure: also accumulate the `attention` policy's in-block measurement into the store's
    staging (what KVStore.observe_attention computes), from the kernel's own scores."""
    n = md.num_actual_tokens
    staging = store.staging
    measured = (staging.received, staging.seen) if measure else (None, None)
    tensors = (query[:n], output[:n], store.pages[layer], staging.key[layer], staging.value[layer], *measured)
    # prepared by the step's first layer, reused by the others (they receive the same metadata
    # object); a layer whose tensors are shaped otherwise prepares its own
    key = (kernel, scale, measure)
    prepared = md.__dict__.get("_adakv_decode")
    if prepared is not None and prepared[0] == key:
        try:
            prepared[1](*tensors)
            return output
        except cpu_ops.StepMismatch:
            pass
    _announce_fused()
    sequences = (staging.slot_of_block, md.block_table, md.seq_lens, md.query_start_loc)
    step = cpu_ops.DecodeStep(*tensors, *sequences, store.layout, scale, kernel)
    md.__dict__["_adakv_decode"] = key, step
    step(*tensors)
    return output


@dataclasses.dataclass(frozen=True)
class StepSplit:
    """A mixed step cut into its decode sequences and its prefill sequences, each with its own
    metadata (token rows renumbered from 0) and the step's token rows it covers: a slice where they
    are consecutive (the usual order: running requests' decodes, then the new prompts), so the
    forward reads the query and writes the output through views, else their indices (copies)."""

    decode: CPUAttentionMetadata | None  # None: the step has no decode rows, or only decode rows
    decode_rows: slice | torch.Tensor | None
    prefill: CPUAttentionMetadata | None
    prefill_rows: slice | torch.Tensor | None


_NO_SPLIT = StepSplit(None, None, None, None)


def split_step(md: CPUAttentionMetadata, num_heads, num_kv_heads, head_size, dtype, isa) -> StepSplit:
    """The step's StepSplit, computed by layer 0 and reused by the other layers of the step (every
    layer of a KV cache group receives the same metadata object)."""
    cached = md.__dict__.get("_adakv_split")
    if cached is None:
        cached = _split(md, num_heads, num_kv_heads, head_size, dtype, isa)
        md.__dict__["_adakv_split"] = cached
    return cached


def _split(md: CPUAttentionMetadata, num_heads, num_kv_heads, head_size, dtype, isa) -> StepSplit:
    num_reqs = md.seq_lens.numel()
    qsl = md.query_start_loc[: num_reqs + 1].to(torch.int64)
    query_lens = qsl[1:] - qsl[:-1]
    is_decode = query_lens == 1
    if not bool(is_decode.any()) or bool(is_decode.all()):
        return _NO_SPLIT

    def part(mask: torch.Tensor, with_scheduler: bool):
        seqs = mask.nonzero().squeeze(1)
        lens = query_lens[seqs]
        rows = torch.cat([torch.arange(int(qsl[s]), int(qsl[s + 1])) for s in seqs.tolist()])
        sub_qsl = torch.zeros(seqs.numel() + 1, dtype=md.query_start_loc.dtype)
        torch.cumsum(lens, 0, out=sub_qsl[1:])
        seq_lens = md.seq_lens[seqs]
        scheduler = None
        if with_scheduler:  # vLLM's kernel plans its work over the batch it is given
            shape = (num_heads, num_kv_heads, head_size, dtype, isa)
            scheduler = scheduler_metadata(*shape, seq_lens, sub_qsl, md.causal)
        sub = dataclasses.replace(
            md,
            num_actual_tokens=rows.numel(),
            max_query_len=int(lens.max()),
            query_start_loc=sub_qsl,
            max_seq_len=int(seq_lens.max()),
            seq_lens=seq_lens,
            block_table=md.block_table[seqs],
            slot_mapping=md.slot_mapping[rows],
            scheduler_metadata=scheduler,
        )
        first, count = int(rows[0]), rows.numel()
        consecutive = int(rows[-1]) - first + 1 == count  # rows ascend: runs of ascending qsl
        return sub, slice(first, first + count) if consecutive else rows

    decode, decode_rows = part(is_decode, with_scheduler=False)
    prefill, prefill_rows = part(~is_decode, with_scheduler=True)
    return StepSplit(decode, decode_rows, prefill, prefill_rows)


def scheduler_metadata(
    num_heads, num_kv_heads, head_size, dtype, isa, seq_lens, query_start_loc, causal=True
):
    """vLLM's CPU attention work plan for a batch (what CPUAttentionMetadataBuilder.build computes),
    for layers without sliding window; seq_lens [B], query_start_loc [B + 1]."""
    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=seq_lens.numel(),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_size,
        seq_lens=seq_lens,
        dtype=dtype,
        query_start_loc=query_start_loc,
        causal=causal,
        sliding_window_size=-1,
        isa=isa,
        enable_kv_split=vllm_envs.VLLM_CPU_ATTN_SPLIT_KV,
    )


@functools.cache
def _announce_fused() -> None:
    logger.info("fused CPU decode attention in use (ADAKV_CPU_ATTENTION=%s)", envs.cpu_attention())


def count_reads(store, md: CPUAttentionMetadata) -> None:
    """Account one step's token reads (sealed pages vs all) once, from layer 0's metadata."""
    bs = store.layout.block_size
    num_reqs = md.seq_lens.numel()
    blocks_per_req = (md.seq_lens.to(torch.int64) + bs - 1) // bs  # [num_reqs]
    width = int(blocks_per_req.max()) if num_reqs else 0
    table = md.block_table[:num_reqs, :width].to(torch.int64)
    needed = torch.arange(width)[None, :] < blocks_per_req[:, None]  # [num_reqs, width]
    sealed_per_req = (store.sealed[table] & needed).sum(1) * bs  # [num_reqs]
    query_lens = md.query_start_loc[1 : num_reqs + 1] - md.query_start_loc[:num_reqs]
    store.count_reads(query_lens, md.seq_lens, sealed_per_req)


# Scratch blocks hold this many tokens where the page block size divides it: stock CPU_ATTN's default
# block size, at which its kernel runs a few percent faster than at AdaKV's 32-token pages.
SCRATCH_BLOCK_TOKENS = 128


def gather_scratch(store, layer: int, md: CPUAttentionMetadata, isa: str):
    """-> scratch [U, num_kv_heads, S, 2*head_size] in stock CPU_ATTN's cache format and the block
    table remapped into it. Each sequence gets scratch blocks of its own, S = SCRATCH_BLOCK_TOKENS
    tokens (several pages) where the page block size divides it, else one page each: its pages in
    order, page j at token j * block_size. The scratch is written with vLLM's own cache-write op,
    since the byte order inside a block depends on the kernel ISA (e.g. AMX packs keys): sealed pages
    decoded first (each distinct page once), open blocks straight from staging's rows (the op skips
    rows mapped to -1), so a fresh prompt's blocks are copied once, not three times. A page that
    several sequences of the step share is written for each of them (the repeats by index)."""
    bs = store.layout.block_size
    per = SCRATCH_BLOCK_TOKENS // bs if bs < SCRATCH_BLOCK_TOKENS and SCRATCH_BLOCK_TOKENS % bs == 0 else 1
    span = per * bs  # tokens per scratch block
    num_reqs = md.seq_lens.numel()
    blocks_per_req = (md.seq_lens.to(torch.int64) + bs - 1) // bs  # [num_reqs]
    width = int(blocks_per_req.max()) if num_reqs else 0
    table = md.block_table[:num_reqs, :width].to(torch.int64)
    page = torch.arange(width)
    needed = page[None, :] < blocks_per_req[:, None]  # [num_reqs, width]
    scratch_per_req = (blocks_per_req + per - 1) // per
    first_block = torch.cumsum(scratch_per_req, 0) - scratch_per_req  # [num_reqs]
    # the scratch row of each needed page's first token
    row = (first_block[:, None] + page // per) * span + page % per * bs  # [num_reqs, width]
    ids, rows = table[needed], row[needed]
    u, h, d = int(scratch_per_req.sum()), store.layout.num_kv_heads, store.layout.record.head_size
    scratch = torch.empty(u, h, 2 * span, d, dtype=store.dtype)
    caches = scratch.chunk(2, dim=2)
    sealed = store.sealed[ids]
    if sealed.any():
        unique, inverse = torch.unique(ids[sealed], return_inverse=True)
        key, value = (x.flatten(0, 1) for x in store.gather(layer, unique))  # [s * bs, H, D]
        _copy_blocks(key, value, inverse, rows[sealed], caches, bs, isa)
    if not sealed.all():
        staging = store.staging
        slots = staging.slot_of_block[ids[~sealed]]
        assert (slots >= 0).all(), "reading a block that has no staging slot"
        _copy_blocks(*staging.rows(layer), slots, rows[~sealed], caches, bs, isa)
    remapped = torch.zeros_like(md.block_table)
    if num_reqs:
        within = torch.arange(int(scratch_per_req.max()))
        mine = within[None, :] < scratch_per_req[:, None]
        remapped[:num_reqs, : within.numel()][mine] = (first_block[:, None] + within)[mine].to(remapped.dtype)
    return scratch.view(u, h, span, 2 * d), remapped


def _copy_blocks(key, value, blocks, rows, caches, bs: int, isa: str) -> None:
    """caches (key, value) rows rows[i] .. rows[i] + bs = the token rows of block blocks[i] of
    key, value ([N, H, D], block b = rows b * bs .. + bs): one cache-write call mapping each source
    row to one place, then the occurrences of repeated blocks that lost any position to another, by index."""
    offsets = torch.arange(bs)
    to = torch.full((key.shape[0],), -1, dtype=torch.int64).view(-1, bs)
    to[blocks] = rows[:, None] + offsets  # a repeated block keeps one occurrence's row per position
    ops.cpu_attn_reshape_and_cache(key, value, *caches, to.view(-1), isa)
    lost = (to[blocks] != rows[:, None] + offsets).any(1)  # per position: index_put_ picks any writer
    if lost.any():
        source = (blocks[lost, None] * bs + offsets).flatten()
        ops.cpu_attn_reshape_and_cache(
            key[source], value[source], *caches, (rows[lost, None] + offsets).flatten(), isa
        )
