"""The learned controller: features, the weights file (corrupt / mismatched -> clear errors), the policy."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adakv_vllm.blocks import planner
from adakv_vllm.controller import model as controller_model
from adakv_vllm.controller.features import FEATURE_NAMES, TYPICAL_LOG_QERR, feature_matrix
from adakv_vllm.controller.policy import BlockTokens, controller_expectations, make_policy
from adakv_vllm.quant.levels import QUANTIZER_ID
from adakv_vllm.quant.precision import PRECISIONS

VOCAB = 49152
GROUP = 64  # the group size the test controllers are written for


def _block(n=32, start=0, seed=0, sampled=True):
    gen = torch.Generator().manual_seed(seed)
    typical = torch.tensor([0.33, 0.17, 0.083, 0.0057])  # relative errors at QERR_BITS 2, 3, 4, 8
    qerr = typical * (0.5 + torch.rand(n, 1, generator=gen))
    s = torch.full((n, 2), float("nan"))
    if sampled:
        s[::2] = torch.tensor([2.0, 0.3])
    ids = torch.randint(0, VOCAB, (n,), generator=gen)
    prior = torch.minimum(torch.randint(0, 3, (n,), generator=gen), torch.arange(start, start + n))
    attention = torch.rand(n, generator=gen)
    attention[5] = float("nan")  # not measured
    return BlockTokens(
        token_ids=ids,
        positions=torch.arange(start, start + n),
        qerr=qerr,
        first_occurrence=prior == 0,
        sampled=s,
        prior_count=prior,
        attention=attention,
    )


def test_feature_matrix_ranges_and_missing_values():
    b = _block()
    qerr = b.qerr.clone()
    qerr[3] = float("nan")
    x = feature_matrix(
        b.token_ids, b.positions, b.prior_count, qerr, b.sampled[:, 0], b.sampled[:, 1], b.attention, VOCAB
    )
    assert x.shape == (32, len(FEATURE_NAMES)) and torch.isfinite(x).all()
    col = {n: x[:, i] for i, n in enumerate(FEATURE_NAMES)}
    assert torch.equal(col["has_dist"], (~torch.isnan(b.sampled[:, 0])).float())
    assert (col["entropy"][1::2] == 0).all() and (col["confidence"][1::2] == 0).all()
    for c, name in enumerate(("log_qerr2", "log_qerr3", "log_qerr4", "log_qerr8")):
        assert col[name][3] == pytest.approx(float(TYPICAL_LOG_QERR[c]))  # unknown -> typical value
        assert col[name][0] == pytest.approx(math.log(b.qerr[0, c]))
    assert torch.equal(col["has_attention"], (~torch.isnan(b.attention)).float())
    assert col["attention"][5] == 0 and col["attention"][0] == pytest.approx(float(b.attention[0]))
    assert ((col["rarity"] > 0) & (col["rarity"] <= 1)).all()
    assert ((col["seq_freq"] >= 0) & (col["seq_freq"] < 1)).all()
    assert col["log_position"][0] == 0


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    m = controller_model.ControllerMLP()
    row = torch.tensor([1.0, 0.3, 0.1, 0.01, 0.0])  # per precision 2, 3, 4, 8, 16 bits
    m.class_sensitivity.copy_(row * torch.arange(1, len(PRECISIONS) + 1)[:, None])
    return m


def _weights(tmp_path, vocab=VOCAB):
    """A controller file as `adakv train-controller` writes it (untrained weights)."""
    path = tmp_path / "smollm2-135m.safetensors"
    meta = {**controller_expectations(GROUP), "model": "SmolLM2-135M", "vocab_size": str(vocab)}
    controller_model.save(_tiny_model(), path, meta)
    return path


def test_save_load_roundtrip(tmp_path):
    path = tmp_path / "c.safetensors"
    m = _tiny_model()
    controller_model.save(m, path, controller_expectations(GROUP))
    loaded, meta = controller_model.load(path, controller_expectations(GROUP))
    x = torch.randn(5, len(FEATURE_NAMES))
    assert torch.equal(loaded(x), m(x))
    assert meta["group_size"] == str(GROUP) and meta["quantizer"] == QUANTIZER_ID


def _write(tmp_path, mutate_tensors=None, mutate_meta=None):
    from safetensors.torch import save_file

    m = _tiny_model()
    tensors = {k: v.clone() for k, v in m.state_dict().items()}
    meta = {
        "format": controller_model.FORMAT,
        "features": json.dumps(list(FEATURE_NAMES)),
        **controller_expectations(GROUP),
    }
    if mutate_tensors:
        mutate_tensors(tensors)
    if mutate_meta:
        mutate_meta(meta)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


BAD_FILES = {
    "missing tensor": (lambda t: t.pop("net.0.weight"), None, "missing tensors"),
    "wrong shape": (lambda t: t.__setitem__("net.4.bias", torch.zeros(4)), None, "shape"),
    "nan weight": (lambda t: t["net.2.weight"].__setitem__((0, 0), float("nan")), None, "NaN"),
    "zero std": (lambda t: t["feature_std"].zero_(), None, "feature_std"),
    "foreign format": (None, lambda m: m.__setitem__("format", "other"), "format"),
    "feature mismatch": (None, lambda m: m.__setitem__("features", json.dumps(["a", "b"])), "features"),
    "group size mismatch": (None, lambda m: m.__setitem__("group_size", "32"), "group_size"),
    "quantizer mismatch": (None, lambda m: m.__setitem__("quantizer", "rtn-v0"), "quantizer"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_corrupt_or_mismatched_weights_raise_naming_the_file(tmp_path, case):
    tensors, meta, needle = BAD_FILES[case]
    path = _write(tmp_path, tensors, meta)
    with pytest.raises(ValueError, match=needle) as e:
        controller_model.load(path, controller_expectations(GROUP))
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "content", [b"", b"not a safetensors file at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{bad"]
)
def test_unreadable_bytes_raise(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable safetensors") as e:
        controller_model.load(path)
    assert str(path) in str(e.value)


def test_truncated_file_raises(tmp_path):
    path = tmp_path / "c.safetensors"
    controller_model.save(_tiny_model(), path, controller_expectations(GROUP))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=str(path)):
        controller_model.load(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        controller_model.load(tmp_path / "nope.safetensors")


def test_learned_policy_without_weights_says_none_is_shipped():
    with pytest.raises(ValueError, match="no learned controller is shipped") as e:
        make_policy("learned", 4, 3, vocab_size=VOCAB, expect=controller_expectations(GROUP))
    assert QUANTIZER_ID in str(e.value) and "adakv train-controller" in str(e.value)
    assert "controller_weights=DIR/smollm2-135m.safetensors" in str(e.value)


@pytest.mark.parametrize("key_bits, value_bits", [(2.5, 2.5), (4.0, 3.0), (3.5, 2.75), (8.0, 8.0)])
def test_learned_policy_allocates_within_budget(tmp_path, key_bits, value_bits):
    from adakv_vllm.quant.format import PageLayout, RecordLayout, page_bytes_for_target

    weights = str(_weights(tmp_path))
    policy = make_policy(
        "learned",
        key_bits,
        value_bits,
        vocab_size=VOCAB,
        weights=weights,
        expect=controller_expectations(GROUP),
    )
    record = RecordLayout(64, GROUP)
    layout = PageLayout(32, 3, record, page_bytes_for_target(32, 3, record, key_bits, value_bits))
    cost = layout.token_costs()
    block = _block(seed=1)
    for part, budget in zip(("key", "value"), layout.part_budgets(key_bits, value_bits), strict=True):
        weight, distortion = policy.scores(block, part)
        assert distortion.shape == (32, len(PRECISIONS)) and (distortion[:, :-1] > distortion[:, 1:]).all()
        bits = planner.allocate(weight, distortion, cost, budget)
        codes = torch.tensor([[p.bits for p in PRECISIONS].index(int(b)) for b in bits])
        assert int(cost[codes].sum()) <= budget
        assert budget - int(cost[codes].sum()) < int(cost[-1] - cost[0])  # spends the budget


def test_learned_policy_rejects_a_quantizer_it_was_not_trained_for(tmp_path):
    weights = str(_weights(tmp_path))
    with pytest.raises(ValueError, match="group_size"):
        make_policy("learned", 3, 3, vocab_size=VOCAB, weights=weights, expect=controller_expectations(32))
    other = {**controller_expectations(GROUP), "quantizer": "another-quantizer"}
    with pytest.raises(ValueError, match="quantizer"):
        make_policy("learned", 3, 3, vocab_size=VOCAB, weights=weights, expect=other)


def test_learned_policy_rejects_another_models_vocab(tmp_path):
    weights = str(_weights(tmp_path))
    with pytest.raises(ValueError, match="vocab"):
        make_policy("learned", 3, 3, vocab_size=32000, weights=weights, expect=controller_expectations(GROUP))


def test_auto_policy_is_learned_only_where_weights_are_named(tmp_path):
    from adakv_vllm.config import AdaKVConfig
    from adakv_vllm.controller.policy import policy_for, resolve

    assert resolve("auto", None)[0] == "attention"  # no controller is shipped
    assert resolve("random", None) == ("random", "asked for")
    weights = str(_weights(tmp_path))
    assert resolve("auto", weights)[0] == "learned"
    policy, _ = policy_for(AdaKVConfig(policy="auto", controller_weights=weights), VOCAB, GROUP)
    assert policy.name == "learned"
    # weights the user names are used, also under auto: a missing or corrupt file is an error naming it
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ValueError, match="missing.safetensors"):
        policy_for(AdaKVConfig(policy="auto", controller_weights=str(missing)), VOCAB, GROUP)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        policy_for(AdaKVConfig(policy="auto", controller_weights=str(corrupt)), VOCAB, GROUP)
    # weights labelled for another group size than the run's
    with pytest.raises(ValueError, match="group_size"):
        policy_for(AdaKVConfig(policy="learned", controller_weights=weights), VOCAB, 32)
