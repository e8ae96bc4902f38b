"""The learned controller: features, the weights file (corrupt / mismatched -> clear errors), the policy."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adakv_vllm.blocks import planner
from adakv_vllm.controller import model as controller_model
from adakv_vllm.controller.features import FEATURE_NAMES, feature_matrix
from adakv_vllm.controller.policy import SHIPPED_WEIGHTS, BlockTokens, controller_expectations, make_policy

VOCAB = 49152


def _block(n=32, start=0, seed=0, sampled=True):
    gen = torch.Generator().manual_seed(seed)
    qerr = torch.stack(
        [
            torch.rand(n, generator=gen) * 0.5 + 0.2,
            torch.rand(n, generator=gen) * 0.1,
            torch.rand(n, generator=gen) * 0.01,
        ],
        1,
    )
    s = torch.full((n, 2), float("nan"))
    if sampled:
        s[::2] = torch.tensor([2.0, 0.3])
    ids = torch.randint(0, VOCAB, (n,), generator=gen)
    prior = torch.minimum(torch.randint(0, 3, (n,), generator=gen), torch.arange(start, start + n))
    return BlockTokens(
        token_ids=ids,
        positions=torch.arange(start, start + n),
        qerr=qerr,
        first_occurrence=prior == 0,
        sampled=s,
        prior_count=prior,
    )


def test_feature_matrix_ranges_and_missing_values():
    b = _block()
    qerr = b.qerr.clone()
    qerr[3] = float("nan")
    x = feature_matrix(b.token_ids, b.positions, b.prior_count, qerr, b.sampled[:, 0], b.sampled[:, 1], VOCAB)
    assert x.shape == (32, len(FEATURE_NAMES)) and torch.isfinite(x).all()
    col = {n: x[:, i] for i, n in enumerate(FEATURE_NAMES)}
    assert torch.equal(col["has_dist"], (~torch.isnan(b.sampled[:, 0])).float())
    assert (col["entropy"][1::2] == 0).all() and (col["confidence"][1::2] == 0).all()
    assert col["log_qerr2"][3] == pytest.approx(math.log(0.45))  # unknown -> typical value
    assert ((col["rarity"] > 0) & (col["rarity"] <= 1)).all()
    assert ((col["seq_freq"] >= 0) & (col["seq_freq"] < 1)).all()
    assert col["log_position"][0] == 0


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    m = controller_model.ControllerMLP()
    m.class_sensitivity.copy_(torch.tensor([[1.0, 0.1, 0.01, 0.0]] * 4) * torch.arange(1, 5)[:, None])
    return m


def test_save_load_roundtrip(tmp_path):
    path = tmp_path / "c.safetensors"
    m = _tiny_model()
    controller_model.save(m, path, controller_expectations(32, True))
    loaded, meta = controller_model.load(path, controller_expectations(32, True))
    x = torch.randn(5, len(FEATURE_NAMES))
    assert torch.equal(loaded(x), m(x))
    assert meta["group_size"] == "32"


def _write(tmp_path, mutate_tensors=None, mutate_meta=None):
    from safetensors.torch import save_file

    m = _tiny_model()
    tensors = {k: v.clone() for k, v in m.state_dict().items()}
    meta = {
        "format": controller_model.FORMAT,
        "features": json.dumps(list(FEATURE_NAMES)),
        **controller_expectations(32, True),
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
    "wrong shape": (lambda t: t.__setitem__("net.4.bias", torch.zeros(5)), None, "shape"),
    "nan weight": (lambda t: t["net.2.weight"].__setitem__((0, 0), float("nan")), None, "NaN"),
    "zero std": (lambda t: t["feature_std"].zero_(), None, "feature_std"),
    "foreign format": (None, lambda m: m.__setitem__("format", "other"), "format"),
    "feature mismatch": (None, lambda m: m.__setitem__("features", json.dumps(["a", "b"])), "features"),
    "quantizer mismatch": (None, lambda m: m.__setitem__("group_size", "64"), "group_size"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_corrupt_or_mismatched_weights_raise_naming_the_file(tmp_path, case):
    tensors, meta, needle = BAD_FILES[case]
    path = _write(tmp_path, tensors, meta)
    with pytest.raises(ValueError, match=needle) as e:
        controller_model.load(path, controller_expectations(32, True))
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
    controller_model.save(_tiny_model(), path, controller_expectations(32, True))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=str(path)):
        controller_model.load(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        controller_model.load(tmp_path / "nope.safetensors")


def test_shipped_weights_load_and_card_matches():
    model, meta = controller_model.load(SHIPPED_WEIGHTS, controller_expectations(32, True))
    card = json.loads(controller_model.card_path(SHIPPED_WEIGHTS).read_text())
    assert card["features"] == list(FEATURE_NAMES)
    assert card["data"]["training_spans"] and meta["vocab_size"] == str(VOCAB)
    table = model.class_sensitivity
    assert (table[:, :-1] >= table[:, 1:]).all()  # expected sensitivity never rises with precision


@pytest.mark.parametrize("target_bits", [2.5, 3.0, 4.0, 8.0])
def test_learned_policy_allocates_within_budget(target_bits):
    from adakv_vllm.quant.format import RecordLayout
    from adakv_vllm.quant.precision import PRECISIONS

    policy = make_policy("learned", target_bits, vocab_size=VOCAB, expect=controller_expectations(32, True))
    block = _block(seed=1)
    weight, distortion = policy.scores(block)
    assert distortion.shape == (32, 4) and (distortion[:, :-1] > distortion[:, 1:]).all()
    record = RecordLayout(64, 32)
    cost = torch.tensor([2 * 3 * record.record_bytes(p) for p in PRECISIONS])
    budget = int(32 * 2 * 3 * record.interpolated_bytes(target_bits))
    bits = planner.allocate(weight, distortion, cost, budget)
    codes = torch.tensor([[p.bits for p in PRECISIONS].index(int(b)) for b in bits])
    assert int(cost[codes].sum()) <= budget
    assert bits.float().mean() >= 2  # spends the budget


def test_learned_policy_rejects_a_quantizer_it_was_not_trained_for():
    with pytest.raises(ValueError, match="group_size"):
        make_policy("learned", 3, vocab_size=VOCAB, expect=controller_expectations(64, True))


def test_learned_policy_rejects_another_models_vocab():
    with pytest.raises(ValueError, match="vocab"):
        make_policy("learned", 3, vocab_size=32000, expect=controller_expectations(32, True))


def test_auto_policy_is_learned_only_where_the_shipped_controller_fits(tmp_path):
    from adakv_vllm.config import AdaKVConfig
    from adakv_vllm.controller.policy import policy_for, resolve

    fits = controller_expectations(32, True)
    assert resolve("auto", VOCAB, None, fits)[0] == "learned"
    assert resolve("auto", 32000, None, fits)[0] == "rule"  # another model: no controller trained for it
    # another quantizer: the qerr features would mean something else, so the engine would refuse the weights
    name, why = resolve("auto", VOCAB, None, controller_expectations(64, True))
    assert name == "rule" and "group_size" in why
    assert resolve("auto", VOCAB, None, controller_expectations(32, False))[0] == "rule"
    assert resolve("random", VOCAB, None, fits) == ("random", "asked for")
    # weights the user names are used, also under auto: a missing or corrupt file is an error naming it
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ValueError, match="missing.safetensors"):
        policy_for(AdaKVConfig(policy="auto", controller_weights=str(missing)), VOCAB)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        policy_for(AdaKVConfig(policy="auto", controller_weights=str(corrupt)), VOCAB)
    policy, why = policy_for(AdaKVConfig(policy="auto", group_size=64), VOCAB)
    assert policy.name == "rule" and "group_size" in why
