"""Fitting the controller: label classes, the loss going down, allocations judged by true labels."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from adakv_vllm.controller import model as controller_model
from adakv_vllm.controller.features import FEATURE_NAMES
from adakv_vllm.training import fit

COST = fit.record_bytes(64, 32)  # [4] K+V bytes per head: 24*2, 40*2, 72*2, 128*2


def _synthetic(n=512, seed=0):
    """Tokens whose 2-bit sensitivity grows with feature 0 (a learnable signal) plus noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(FEATURE_NAMES), generator=gen)
    s2 = (x[:, 0] * 1.5).exp() * 0.5
    s = torch.stack([s2, s2 / 20, s2 / 400], 1)
    return x, fit.full_sensitivity(s)


def test_full_sensitivity_is_non_increasing_and_zero_at_16_bits():
    s = fit.full_sensitivity(torch.tensor([[1.0, 2.0, 0.1], [0.5, 0.2, 0.3]]))
    assert torch.equal(s[:, -1], torch.zeros(2))
    assert (s[:, :-1] >= s[:, 1:]).all()


@pytest.mark.parametrize("label_bits", [3.0, 4.0, 6.0])
def test_label_classes_average_the_requested_bits(label_bits):
    _, s = _synthetic()
    classes, lam = fit.label_classes(s, COST, label_bits)
    bits = torch.tensor([2.0, 4.0, 8.0, 16.0])[classes]
    assert lam > 0 and abs(float(bits.mean()) - label_bits) < 1.0


def test_fit_learns_the_signal_and_beats_random_allocation():
    x, s = _synthetic()
    settings = fit.FitSettings(epochs=150)
    losses = []
    model, info = fit.fit(x, s, COST, settings, progress=lambda e, loss: losses.append(loss))
    assert losses[-1] < losses[0] * 0.8
    xv, sv = _synthetic(seed=1)
    metrics = fit.classification_metrics(model, xv, sv, COST, settings.label_bits)
    assert metrics["spearman_s2"] > 0.8
    blocks = []
    for k in range(0, 512, 32):
        blocks.append(
            {
                "token_ids": torch.arange(32),
                "positions": torch.arange(k, k + 32) + 64,
                "prior_count": torch.zeros(32, dtype=torch.int64),
                "qerr": torch.full((32, 3), 0.1),
                "s": sv[k : k + 32],
                "x": xv[k : k + 32],
            }
        )
    regret = fit.allocation_regret(blocks, model, COST, 3.0, 64, 32)
    assert regret["oracle"] <= regret["learned"] < regret["random"]


def test_train_controller_command_small_run(tmp_path):
    """The whole command on the embedded model at toy sizes: weights + card that the policy loads."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "adakv_vllm.engine.cli",
        "train-controller",
        "--windows",
        "5",
        "--shard",
        "3",
        "--window",
        "8",
        "--horizon",
        "2",
        "--position-stride",
        "4",
        "--epochs",
        "5",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "labelling windows 3..4" in done.stderr
    card = json.loads((out / "smollm2-135m.card.json").read_text())
    assert card["data"]["num_windows"] == 5 and len(card["data"]["training_spans"]) == 5
    assert set(card["metrics"]["regret_nats"]["3.0"]) == {"oracle", "random", "rule", "learned"}
    controller_model.load(out / "smollm2-135m.safetensors", {"group_size": "32", "rotate_keys": "true"})
    # resumable: a second run reuses both label shards
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "labelling windows" not in again.stderr
