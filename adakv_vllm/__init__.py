"""adakv_vllm: per-token mixed-precision KV cache for vLLM.

`register()` is the `vllm.general_plugins` entry point. vLLM calls it in the front-end, the
EngineCore and every worker, so it must be idempotent and cheap, and it imports vLLM only inside.
"""

from __future__ import annotations

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Entry point of the `vllm.general_plugins` group. Idempotent."""
    global _registered
    if _registered:
        return
    from adakv_vllm.engine.plugin import install

    install()
    _registered = True
