"""The labeller's probe forward and sensitivity labels, on a tiny random Llama (no weights needed)."""

from __future__ import annotations

import pytest
import torch

from adakv_vllm.controller.features import QERR_BITS
from adakv_vllm.kernels.block_attention import block_attention
from adakv_vllm.training import labels
from adakv_vllm.training.forward import BLOCK_SIZE, LlamaProbe


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
    assert attention.shape == (2, 23) and ((attention > 0) & (attention <= 1)).all()
    cont, _, _ = probe.continue_from(
        ids[:, 17:], [k[:, :, :17] for k in keys], [v[:, :, :17] for v in values]
    )
    torch.testing.assert_close(cont, ref[:, 17:], rtol=1e-5, atol=1e-5)


def _engine_attention(model, ids: torch.Tensor, steps: list[int]) -> torch.Tensor:
    """What the serving engine measures for one sequence ids [L], written in steps of the given
    token counts: kernels/block_attention.py per step and layer over bf16 staging, from the Hugging
    Face forward's queries and keys, accumulated as KVStore does -> [L] received / seen."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    n, bs = ids.numel(), BLOCK_SIZE
    num_blocks = -(-n // bs)
    received, seen = torch.zeros(num_blocks, bs), torch.zeros(num_blocks, bs)
    with torch.no_grad():
        hidden = model(ids[None], output_hidden_states=True).hidden_states  # [0] = embeddings
        for layer, h in zip(model.model.layers, hidden, strict=False):  # each layer's input
            attn, x = layer.self_attn, layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, n, hq, d).transpose(1, 2)
            k = attn.k_proj(x).view(1, n, hkv, d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, *model.model.rotary_emb(h, torch.arange(n)[None]))
            staging = torch.zeros(num_blocks * bs, hkv, d, dtype=torch.bfloat16)
            staging[:n] = k[0].transpose(0, 1)
            staging = staging.view(num_blocks, bs, hkv, d)  # [num_slots, block_size, Hkv, D]
            query = q[0].transpose(0, 1).bfloat16()  # [L, Hq, D] as a bf16 model computes it
            start = 0
            for size in steps:
                mapping = torch.arange(start, min(start + size, n))  # vLLM slots: block b = slot // bs
                slots, r, s = block_attention(
                    query[mapping], staging, torch.arange(num_blocks), mapping, bs, d**-0.5
                )
                received.index_add_(0, slots, r)
                seen.index_add_(0, slots, s)
                start += size
    return (received / seen).flatten()[:n]


STEPS = {  # how the engine writes a 75-token sequence (two full blocks and a partial one)
    "one prefill": [75],
    "block by block": [BLOCK_SIZE] * 3,
    "odd chunks": [7] * 11,
    "decode": [1] * 75,
}


@pytest.mark.parametrize("name", STEPS)
def test_attention_feature_is_what_the_engine_measures(tiny, name):
    ids = torch.randint(0, 97, (2, 75), generator=torch.Generator().manual_seed(1))
    _, _, _, attention = LlamaProbe(tiny).prefill(ids)
    for row in range(2):
        expected = _engine_attention(tiny, ids[row], STEPS[name])
        torch.testing.assert_close(attention[row], expected, rtol=1e-5, atol=1e-6)


def test_labels_are_zero_when_storage_is_exact(tiny, monkeypatch):
    monkeypatch.setattr(labels, "stored_kv", lambda x, p, g: x.float())
    settings = labels.LabelSettings(window=8, horizon=4, position_stride=3, dense_head=2, group_size=32)
    out = labels.label_batch(LlamaProbe(tiny), torch.randint(0, 97, (2, 12)), settings, progress=False)
    assert out["sensitivity"].shape == (2, len(settings.positions()), len(labels.LABEL_BITS))
    assert out["sensitivity"].abs().max() < 1e-6


def test_labels_fall_with_precision(tiny):
    settings = labels.LabelSettings(window=8, horizon=4, position_stride=1, group_size=32)
    out = labels.label_batch(LlamaProbe(tiny), torch.randint(0, 97, (3, 12)), settings, progress=False)
    s = out["sensitivity"]  # [W, P, 4] at 2/3/4/8 bits
    assert labels.LABEL_BITS == QERR_BITS == (2, 3, 4, 8)
    assert (s >= 0).all() and torch.isfinite(s).all()
    totals = s.sum((0, 1))
    assert (totals[:-1] > totals[1:]).all()
    qerr = out["qerr"]  # [W, window, 4]
    assert qerr.shape == (3, 8, 4) and (qerr[..., :-1] > qerr[..., 1:]).all()
    assert out["attention"].shape == (3, 8) and torch.isfinite(out["attention"]).all()
    assert out["prior_count"].dtype == torch.int64 and torch.isnan(out["entropy"][:, 0]).all()


@pytest.mark.parametrize("kernel", ["compiled", "torch fallback"])
def test_qerr_is_the_workers_measurement(tiny, monkeypatch, kernel):
    """The mean over layers of (K error + V error) / 2 at QERR_BITS, from the bf16 K/V, as
    KVStore.step_features computes it (compared with the oracle, reference.relative_errors)."""
    from adakv_vllm.quant.precision import Precision
    from adakv_vllm.quant.reference import relative_errors

    if kernel == "torch fallback":
        monkeypatch.setattr(labels.library, "load", lambda: None)
    settings = labels.LabelSettings(window=5, horizon=1, group_size=16)
    ids = torch.randint(0, 97, (2, 6))
    logits, keys, values, attention = LlamaProbe(tiny).prefill(ids)
    raw = labels.raw_features(ids, logits, keys, values, attention, settings)
    precisions = [Precision(b) for b in QERR_BITS]
    for w, t in ((0, 0), (1, 4)):
        per_layer = [
            relative_errors(x[w, :, t][None].bfloat16(), precisions, 16)[0]
            for kv in zip(keys, values, strict=True)
            for x in kv
        ]
        torch.testing.assert_close(raw["qerr"][w, t], torch.stack(per_layer).mean(0))


def test_training_windows_avoid_the_excluded_spans():
    starts = labels.training_starts(10_000, 300, 10, [(0, 512), (5000, 5512), (9000, 9512)])
    assert len(starts) == 10 and len(set(starts)) == 10
    for s in starts:
        for a, b in [(0, 512), (5000, 5512), (9000, 9512)]:
            assert s + 300 <= a or s >= b
        assert s + 300 <= 10_000
    with pytest.raises(ValueError, match="avoid the evaluation spans"):
        labels.training_starts(1000, 300, 10, [])
