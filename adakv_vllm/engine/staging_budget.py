"""How much FP16 staging an engine reserves: the same number in the worker (which charges it to the KV
memory budget and allocates it) and in the scheduler (which admits requests against it).

Both sides compute it from the allocated KV cache (`for_kv_cache`); before the KV cache exists the
worker subtracts the equivalent share of the memory it found (`bytes_for_available`). Reads vLLM's
config objects, imports nothing from vLLM.
"""

from __future__ import annotations

from adakv_vllm.blocks.staging import StagingArea, reserve_slots, worst_case_slots


def slot_bytes(vllm_config) -> int:
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    return StagingArea.slot_bytes(
        model.get_num_layers(parallel),
        vllm_config.cache_config.block_size,
        model.get_num_kv_heads(parallel),
        model.get_head_size(),
        model.dtype.itemsize,
    )


def worst_case(vllm_config) -> int:
    sched = vllm_config.scheduler_config
    return worst_case_slots(
        sched.max_num_seqs, sched.max_num_batched_tokens, vllm_config.cache_config.block_size
    )


def for_kv_cache(vllm_config, cfg, kv_cache_config) -> int:
    """Staging slots of an engine whose KV cache is `kv_cache_config` (one KV cache group)."""
    group = kv_cache_config.kv_cache_groups[0]
    kv_bytes = kv_cache_config.num_blocks * group.kv_cache_spec.page_size_bytes * len(group.layer_names)
    return reserve_slots(kv_bytes, slot_bytes(vllm_config), cfg.staging_fraction, worst_case(vllm_config))


def bytes_for_available(vllm_config, cfg, available: int) -> int:
    """What to subtract from `available` KV bytes so that staging gets its share of them."""
    per_slot = slot_bytes(vllm_config)
    share = reserve_slots(
        int(available * (1 - cfg.staging_fraction)), per_slot, cfg.staging_fraction, worst_case(vllm_config)
    )
    return share * per_slot
