"""Per-process state shared by the worker and the attention layers: the config and the KVStore.

vLLM constructs attention impls and calls them without a handle we control, so the worker publishes
the AdaKVConfig (before the model is built) and the KVStore (after the KV cache is allocated) here.
"""

from __future__ import annotations

from adakv_vllm.blocks.store import KVStore
from adakv_vllm.config import AdaKVConfig

_config: AdaKVConfig | None = None
_store: KVStore | None = None


def set_config(cfg: AdaKVConfig) -> None:
    global _config
    _config = cfg


def config() -> AdaKVConfig:
    if _config is None:
        raise RuntimeError("AdaKV attention used in a process whose worker did not set the AdaKV config")
    return _config


def set_store(store: KVStore | None) -> None:
    global _store
    _store = store


def store() -> KVStore:
    if _store is None:
        raise RuntimeError("AdaKV KV store is not initialised (KV cache not allocated yet)")
    return _store


def has_store() -> bool:
    return _store is not None
