"""The embedded model: provisioned offline, reused, pass-through for other names, and it works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adakv_vllm import model_store


@pytest.mark.parametrize(
    "name",
    [
        "HuggingFaceTB/SmolLM-360M",
        # the hub id of the embedded model names the real bf16 weights, not the Q4_1 conversion
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "/some/folder",
    ],
)
def test_other_names_pass_through(name):
    assert model_store.resolve_model(name) == name


def test_embedded_model_is_reused(model_path):
    assert model_store.resolve_model(None) == model_path
    for alias in ("default", "smollm2", "SmolLM2-135M-Instruct"):
        assert model_store.resolve_model(alias) == model_path
    folder = Path(model_path)
    assert (folder / model_store.COMPLETE_MARKER).is_file()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def test_incomplete_cache_is_not_trusted(tmp_path, monkeypatch, model_path):
    """A folder without the marker (a crashed conversion) is never served as the model."""
    monkeypatch.setenv("ADAKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ADAKV_OFFLINE", "1")
    target = tmp_path / f"{model_store.DEFAULT_MODEL}-v{model_store.CONVERSION_VERSION}"
    target.mkdir()
    (target / "config.json").write_text("{}")
    assert not model_store._is_complete(target)


def test_concurrent_conversions_leave_one_complete_copy(tmp_path):
    """Two processes converting at once: both succeed and the cache holds one complete folder."""
    env = dict(os.environ, ADAKV_CACHE_DIR=str(tmp_path), ADAKV_OFFLINE="1")
    cmd = [sys.executable, "-m", "adakv_vllm.engine.cli", "model", "path"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1].decode()[-2000:] for o in outs]
    paths = {o[0].decode().strip() for o in outs}
    assert len(paths) == 1
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert entries == [Path(paths.pop()).name]  # no temporary folder left behind
    assert model_store._is_complete(tmp_path / entries[0])


def test_greedy_paris_with_transformers(model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :]).startswith(" Paris")


@pytest.mark.parametrize("name", ["model", "demo"])
def test_cli_help(name):
    out = subprocess.run(
        [sys.executable, "-m", "adakv_vllm.engine.cli", name, "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "usage" in out.stdout
