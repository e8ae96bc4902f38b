"""The labeller's probe forward and sensitivity labels, on a tiny random Llama (no weights needed)."""

from __future__ import annotations

import pytest
import torch

from adakv_vllm.training import labels
from adakv_vllm.training.forward import LlamaProbe


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).float().eval()


def test_probe_matches_the_hugging_face_forward(tiny):
    probe = LlamaProbe(tiny)
    ids = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        ref = tiny(ids).logits
    logits, keys, values, attention = probe.prefill(ids)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)  # same fp32 ops, reassembled
    assert attention.shape == (2, 4, 23, 23)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4, 23))
    cont, _, _ = probe.continue_from(
        ids[:, 17:], [k[:, :, :17] for k in keys], [v[:, :, :17] for v in values]
    )
    torch.testing.assert_close(cont, ref[:, 17:], rtol=1e-5, atol=1e-5)


def test_labels_are_zero_when_storage_is_exact(tiny, monkeypatch):
    monkeypatch.setattr(labels, "stored_kv", lambda x, p, g, r: x.float())
    settings = labels.LabelSettings(window=8, horizon=4, position_stride=3, dense_head=2, group_size=32)
    out = labels.label_batch(LlamaProbe(tiny), torch.randint(0, 97, (2, 12)), settings, progress=False)
    assert out["sensitivity"].shape == (2, len(settings.positions()), 3)
    assert out["sensitivity"].abs().max() < 1e-6


def test_labels_fall_with_precision(tiny):
    settings = labels.LabelSettings(window=8, horizon=4, position_stride=1, group_size=32)
    out = labels.label_batch(LlamaProbe(tiny), torch.randint(0, 97, (3, 12)), settings, progress=False)
    s = out["sensitivity"]  # [W, P, 3] at 2/4/8 bits
    assert (s >= 0).all() and torch.isfinite(s).all()
    assert s[..., 0].sum() > s[..., 1].sum() > s[..., 2].sum()
    assert out["qerr"].shape == (3, 8, 3) and (out["qerr"][..., 0] > out["qerr"][..., 2]).all()
    assert out["prior_count"].dtype == torch.int64 and torch.isnan(out["entropy"][:, 0]).all()


def test_training_windows_avoid_the_excluded_spans():
    starts = labels.training_starts(10_000, 300, 10, [(0, 512), (5000, 5512), (9000, 9512)])
    assert len(starts) == 10 and len(set(starts)) == 10
    for s in starts:
        for a, b in [(0, 512), (5000, 5512), (9000, 9512)]:
            assert s + 300 <= a or s >= b
        assert s + 300 <= 10_000
    with pytest.raises(ValueError, match="avoid the evaluation spans"):
        labels.training_starts(1000, 300, 10, [])
