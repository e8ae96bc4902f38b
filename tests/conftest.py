"""Shared fixtures. The embedded model is converted once per test session (never downloaded)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def model_path() -> str:
    from adakv_vllm.model_store import embedded_model_path

    return str(embedded_model_path())
