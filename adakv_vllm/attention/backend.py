"""AdaKVAttentionBackend: vLLM's CUSTOM attention slot, reading heterogeneous uint8 pages.

Writes go to FP16 staging (`do_kv_cache_update`). Reads take one of two paths:
  fused    pure-decode steps (every query_len == 1): the C++ kernel of attention/ops/cpu.py reads the
           packed pages and staging in place (ADAKV_CPU_ATTENTION=auto|fused).
  scratch  every other step (prefill, chunked prefill, mixed), or ADAKV_CPU_ATTENTION=scratch: gather
           the blocks the step needs -- sealed pages decoded, open blocks from staging -- into a small
           bf16 scratch cache laid out like stock CPU_ATTN's, and run vLLM's own CPU attention kernel
           over it with a remapped block table. At 16 bits the scratch holds exactly the bytes stock
           vLLM would have cached, so outputs match stock.
Both paths fill `output[:num_actual_tokens]` ([num_tokens, num_heads, head_size], the query dtype),
as stock CPU_ATTN does, and layer 0 accounts the step's sealed/total token reads.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backend import AttentionType, MultipleOf
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from adakv_vllm import envs
from adakv_vllm.attention import runtime
from adakv_vllm.attention.ops import cpu as cpu_ops
from adakv_vllm.blocks import spec as spec_glue

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
        self._fused = cpu_ops.fused_kernel() if plain else None

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
        if self._fused is not None and attn_metadata.max_query_len == 1:
            return fused_decode(self._fused, store, index, query, attn_metadata, self.scale, output)
        scratch, block_table = gather_scratch(store, index, attn_metadata, layer.isa)
        metadata = dataclasses.replace(attn_metadata, block_table=block_table)
        return super().forward(
            layer, query, key, value, scratch, metadata, output, output_scale, output_block_scale
        )


def fused_decode(kernel, store, layer: int, query, md: CPUAttentionMetadata, scale: float, output):
    """query, output: [num_tokens, num_heads, head_size]; fills output[:num_actual_tokens]."""
    _announce_fused()
    n = md.num_actual_tokens
    cpu_ops.paged_attention(
        query[:n],
        store.pages[layer],
        store.staging.key[layer],
        store.staging.value[layer],
        store.staging.slot_of_block,
        md.block_table,
        md.seq_lens,
        md.query_start_loc,
        store.layout,
        scale,
        store.rotate_keys,
        out=output[:n],
        module=kernel,
    )
    return output


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


def gather_scratch(store, layer: int, md: CPUAttentionMetadata, isa: str):
    """-> scratch [U, num_kv_heads, block_size, 2*head_size] in stock CPU_ATTN's cache format and
    the block table remapped into it. The scratch is written with vLLM's own cache-write op, since
    the byte order inside a block depends on the kernel ISA (e.g. AMX packs keys)."""
    bs = store.layout.block_size
    num_reqs = md.seq_lens.numel()
    blocks_per_req = (md.seq_lens.to(torch.int64) + bs - 1) // bs  # [num_reqs]
    width = int(blocks_per_req.max()) if num_reqs else 0
    table = md.block_table[:num_reqs, :width].to(torch.int64)
    needed = torch.arange(width)[None, :] < blocks_per_req[:, None]  # [num_reqs, width]
    block_ids, inverse = torch.unique(table[needed], return_inverse=True)
    key, value = store.gather(layer, block_ids)  # [U, bs, H, D]
    u, _, h, d = key.shape
    scratch = torch.empty(u, h, 2 * bs, d, dtype=key.dtype)
    key_cache, value_cache = scratch.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(
        key.reshape(u * bs, h, d),
        value.reshape(u * bs, h, d),
        key_cache,
        value_cache,
        torch.arange(u * bs, dtype=torch.int64),
        isa,
    )
    remapped = torch.zeros_like(md.block_table)
    remapped[:num_reqs, :width][needed] = inverse.to(remapped.dtype)
    return scratch.view(u, h, bs, 2 * d), remapped
