"""vLLM spec glue: the uint8 page that vLLM's block manager allocates for each layer.

vLLM sizes a layer's page as num_kv_heads x block_size x state_content_bytes; we choose
state_content_bytes so the page holds our PageLayout for the user's target bits (rounded up to a
whole byte per head-token, which only adds budget).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from adakv_vllm.config import AdaKVConfig
from adakv_vllm.quant import format as fmt


def page_layout(block_size: int, num_kv_heads: int, head_size: int, cfg: AdaKVConfig) -> fmt.PageLayout:
    record = fmt.RecordLayout(head_size, cfg.group_size_for(head_size))
    need = fmt.page_bytes_for_target(block_size, num_kv_heads, record, *cfg.key_value_bits())
    per_head_token = math.ceil(need / (num_kv_heads * block_size))
    return fmt.PageLayout(block_size, num_kv_heads, record, per_head_token * num_kv_heads * block_size)


def layout_of_spec(spec, cfg: AdaKVConfig) -> fmt.PageLayout:
    """The PageLayout of an already customised vLLM AttentionSpec (scheduler and worker side)."""
    layout = page_layout(spec.block_size, spec.num_kv_heads, spec.head_size, cfg)
    if spec.dtype != torch.uint8 or layout.page_bytes != spec.page_size_bytes:
        # Our backend's customize_spec did not shape this KV cache: AdaKV is asked for but not active.
        raise RuntimeError(
            f"AdaKV is enabled but the KV cache spec is {spec.dtype} with {spec.page_size_bytes}-byte "
            f"pages (expected uint8, {layout.page_bytes}); another attention backend was selected"
        )
    return layout


def customize(spec, cfg: AdaKVConfig):
    """AttentionSpec -> the same spec with uint8 pages sized for cfg.target_bits."""
    layout = page_layout(spec.block_size, spec.num_kv_heads, spec.head_size, cfg)
    per_head_token = layout.page_bytes // (spec.num_kv_heads * spec.block_size)
    return dataclasses.replace(spec, dtype=torch.uint8, state_content_bytes=per_head_token)
