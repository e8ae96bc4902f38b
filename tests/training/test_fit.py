"""Fitting the controller: label classes, the loss going down, allocations judged by true labels."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from adakv_vllm.controller import model as controller_model
from adakv_vllm.controller.features import FEATURE_NAMES, NUM_QERR
from adakv_vllm.controller.policy import BlockTokens, controller_expectations, make_policy
from adakv_vllm.quant.levels import QUANTIZER_ID
from adakv_vllm.quant.precision import ALL_BITS, PRECISIONS
from adakv_vllm.training import fit
from adakv_vllm.training.labels import LABEL_BITS

COST = fit.record_bytes(64, 64)  # [5] K+V bytes per head: 18*2, 26*2, 34*2, 66*2, 128*2


def _synthetic(n=512, seed=0):
    """Tokens whose 2-bit sensitivity grows with feature 0 (a learnable signal) plus noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(FEATURE_NAMES), generator=gen)
    s2 = (x[:, 0] * 1.5).exp() * 0.5
    s = torch.stack([s2, s2 / 4, s2 / 16, s2 / 4000], 1)  # at LABEL_BITS 2, 3, 4, 8
    return x, fit.full_sensitivity(s)


def test_record_bytes_price_every_precision():
    assert COST.tolist() == [36.0, 52.0, 68.0, 132.0, 256.0]


def test_full_sensitivity_is_non_increasing_and_zero_at_16_bits():
    s = fit.full_sensitivity(torch.tensor([[1.0, 2.0, 0.1, 0.2], [0.5, 0.2, 0.3, 0.0]]))
    assert s.shape == (2, len(PRECISIONS)) and len(LABEL_BITS) == len(PRECISIONS) - 1
    assert torch.equal(s[:, -1], torch.zeros(2))
    assert (s[:, :-1] >= s[:, 1:]).all()


@pytest.mark.parametrize("label_bits", [3.0, 4.0, 6.0])
def test_label_classes_average_the_requested_bits(label_bits):
    _, s = _synthetic()
    classes, lam = fit.label_classes(s, COST, label_bits)
    bits = torch.tensor([float(b) for b in ALL_BITS])[classes]
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
                "qerr": torch.full((32, NUM_QERR), 0.1),
                "attention": torch.rand(32, generator=torch.Generator().manual_seed(k)),
                "s": sv[k : k + 32],
                "x": xv[k : k + 32],
            }
        )
    regret = fit.allocation_regret(blocks, model, COST, 3.0, 64, 64)
    assert set(regret) == {"oracle", "random", "rule", "attention", "learned"}
    assert regret["oracle"] <= regret["learned"] < min(regret["random"], regret["attention"])


def test_train_controller_command_small_run(tmp_path):
    """The whole command on the embedded model at toy sizes: weights + card that the policy loads."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "adakv_vllm.engine.cli",
        "train-controller",
        "--sources",
        "wikitext,hellaswag",
        "--windows",
        "6",
        "--shard",
        "2",
        "--window",
        "8",
        "--horizon",
        "2",
        "--position-stride",
        "4",
        "--epochs",
        "5",
        "--threads",  # toy sizes gain nothing from threads, and lose much on a busy machine
        "1",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "labelling wikitext windows 2..2" in done.stderr
    assert "labelling hellaswag windows 0..1" in done.stderr
    card = json.loads((out / "smollm2-135m.card.json").read_text())
    data = card["data"]
    assert data["num_windows"] == 6 and len(data["training_spans"]) == 3  # WikiText's windows only
    assert [s["name"] for s in data["sources"]] == ["wikitext", "hellaswag"]
    assert [s["held_out_windows"] for s in data["sources"]] == [1, 1]  # the last of each source
    assert data["mc_examples"] == {"hellaswag": [5021, 10042]}  # the second half of the file
    assert set(card["metrics"]["regret_nats_by_source"]) == {"wikitext", "hellaswag"}
    assert card["features"] == list(FEATURE_NAMES) and card["labels"]["quantizer"] == QUANTIZER_ID
    assert set(card["metrics"]["regret_nats"]["3.0"]) == {"oracle", "random", "rule", "attention", "learned"}
    weights = out / "smollm2-135m.safetensors"
    meta = controller_model.read_metadata(weights)
    assert meta["quantizer"] == QUANTIZER_ID and meta["group_size"] == "64"
    # the engine's own path: the learned policy loads the weights for the run's quantizer and scores
    vocab = int(meta["vocab_size"])
    policy = make_policy(
        "learned", 4.0, 3.0, weights=str(weights), vocab_size=vocab, expect=controller_expectations(64)
    )
    block = BlockTokens(
        token_ids=torch.arange(100, 132),
        positions=torch.arange(32, 64),
        qerr=torch.tensor([0.33, 0.17, 0.083, 0.0057]).expand(32, -1),
        first_occurrence=torch.ones(32, dtype=torch.bool),
        prior_count=torch.zeros(32, dtype=torch.int64),
        attention=torch.linspace(0.01, 1.0, 32),
    )
    for part in ("key", "value"):
        weight, distortion = policy.scores(block, part)
        assert weight.shape == (32,) and distortion.shape == (32, len(PRECISIONS))
        assert torch.isfinite(distortion).all() and (distortion[:, :-1] > distortion[:, 1:]).all()
    # resumable: a second run reuses both label shards
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "labelling" not in again.stderr


def test_train_controller_refuses_bad_sources_before_labelling(tmp_path):
    cmd = [sys.executable, "-m", "adakv_vllm.engine.cli", "train-controller", "--out", str(tmp_path / "out")]
    for sources, message in (("wikitext,reddit", "unknown training source"), (",", "no training source")):
        done = subprocess.run([*cmd, "--sources", sources], capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()  # nothing written
