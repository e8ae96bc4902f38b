"""KVStore without vLLM: staging writes, sealing, gathers, re-opening, release, features."""

from __future__ import annotations

import pytest
import torch

from adakv_vllm.blocks.spec import page_layout
from adakv_vllm.blocks.staging import StagingArea, StagingFullError
from adakv_vllm.blocks.store import KVStore
from adakv_vllm.config import AdaKVConfig
from adakv_vllm.quant import reference as ref

BS, H, D, LAYERS, BLOCKS = 16, 3, 64, 2, 10


def make_store(target=16, max_slots=8, track_attention=False):
    layout = page_layout(BS, H, D, AdaKVConfig(target_bits=target, key_value_split=0, group_size=32))
    store = KVStore(layout, LAYERS, BLOCKS, torch.bfloat16, max_slots, track_attention)
    for layer in range(LAYERS):
        kv = torch.zeros(BLOCKS, H, BS, layout.page_bytes // (H * BS), dtype=torch.uint8)
        store.bind(layer, kv)
    return store


def write_tokens(store, slots, seed=0):
    """Write random K/V for `slots` in every layer; returns the bf16 tensors per layer."""
    gen = torch.Generator().manual_seed(seed)
    written = []
    for layer in range(LAYERS):
        k = torch.randn(len(slots), H, D, generator=gen).bfloat16()
        v = torch.randn(len(slots), H, D, generator=gen).bfloat16()
        store.write(layer, torch.tensor(slots), k, v)
        written.append((k, v))
    return written


def test_staging_roundtrip_and_padding_ignored():
    store = make_store()
    store.begin_step()
    slots = [3 * BS + i for i in range(BS)] + [-1]
    written = write_tokens(store, slots)
    for layer, (k, v) in enumerate(written):
        key, value = store.gather(layer, torch.tensor([3]))
        assert torch.equal(key[0], k[:BS]) and torch.equal(value[0], v[:BS])
    assert store.staging.num_used == 1


def test_seal_16_bits_is_exact_and_frees_staging():
    store = make_store(target=16)
    written = write_tokens(store, [5 * BS + i for i in range(BS)])
    bits = torch.full((1, BS), 16)
    assert store.seal(torch.tensor([5]), bits, bits) == []
    assert bool(store.sealed[5]) and store.staging.num_used == 0
    for layer, (k, v) in enumerate(written):
        key, value = store.gather(layer, torch.tensor([5]))
        assert torch.equal(key[0], k) and torch.equal(value[0], v)
    kb, vb = store.bits(torch.tensor([5]))
    assert torch.equal(kb, bits) and torch.equal(vb, bits)


def test_seal_quantized_matches_oracle():
    store = make_store(target=4)
    written = write_tokens(store, [2 * BS + i for i in range(BS)])
    bits = torch.full((1, BS), 4)
    store.seal(torch.tensor([2]), bits, bits)
    k, v = written[1]
    page = ref.pack_page(store.layout, k, v, bits[0], bits[0])
    assert torch.equal(store.pages[1][2], page)


def test_write_reopens_a_sealed_block():
    store = make_store()
    write_tokens(store, [BS * 1 + i for i in range(BS)], seed=1)
    bits = torch.full((1, BS), 16)
    store.seal(torch.tensor([1]), bits, bits)
    new = write_tokens(store, [BS * 1 + 0], seed=2)  # vLLM re-allocated block 1
    assert not bool(store.sealed[1])
    key, _ = store.gather(0, torch.tensor([1]))
    assert torch.equal(key[0, 0], new[0][0][0])


def test_seal_skips_unstaged_and_sealed_blocks():
    store = make_store()
    write_tokens(store, [BS * 4 + i for i in range(BS)])
    bits = torch.full((3, BS), 16)
    assert store.seal(torch.tensor([4]), bits[:1], bits[:1]) == []
    # 4 is sealed already (skipped quietly); 7 and 8 were never written: returned as unsealed
    assert store.seal(torch.tensor([4, 7, 8]), bits, bits) == [7, 8]
    assert not bool(store.sealed[7]) and not bool(store.sealed[8])


# One poisoned token per case: (key or value, the value written, target bits, sanitised). NaNs and
# over-long keys used to make KVStore.seal raise inside the worker, which kills the engine for every
# request; an inf is clamped to the quantizable bound as before (no warning).
POISON = [
    ("key", float("nan"), 16, True),
    ("value", float("nan"), 16, True),
    ("key", float("nan"), 4, True),
    ("value", float("nan"), 2, True),
    ("value", float("inf"), 4, False),
    ("key", float("inf"), 16, False),
    ("key", float("-inf"), 2, False),
    ("key", "long", 4, True),  # a finite row of 9000s rotates to 72000 in one channel: past the fp16 scale
]


@pytest.mark.parametrize("use_kernel", [True, False], ids=["compiled", "torch"])
@pytest.mark.parametrize(("part", "poison", "target", "sanitised"), POISON)
def test_seal_never_raises_on_values_the_model_wrote(
    monkeypatch, caplog, part, poison, target, sanitised, use_kernel
):
    from adakv_vllm.blocks import store as store_module
    from adakv_vllm.kernels import library

    if not use_kernel:
        monkeypatch.setattr(library, "load", lambda: None)
    store = make_store(target=target)
    written = write_tokens(store, [6 * BS + i for i in range(BS)])
    x = store.staging.key if part == "key" else store.staging.value
    slot = int(store.staging.slot_of_block[6])
    if poison == "long":
        x[1, slot, 3, 2] = 9000.0  # layer 1, token 3, KV head 2: the whole row
    else:
        x[1, slot, 3, 2, 5] = poison  # one element of that row
    bits = torch.full((1, BS), target)
    store_module.logger.addHandler(caplog.handler)  # vLLM's logging config may stop propagation
    try:
        assert store.seal(torch.tensor([6]), bits, bits, owners=["req-poisoned"]) == []
    finally:
        store_module.logger.removeHandler(caplog.handler)
    assert bool(store.sealed[6]) and ("req-poisoned" in caplog.text) == sanitised
    key, value = store.gather(1, torch.tensor([6]))
    assert torch.isfinite(key).all() and torch.isfinite(value).all()
    got = (key if part == "key" else value)[0, 3, 2].float()
    if poison == "long":
        assert got.norm() <= store_module.MAX_ROW_NORM * 1.05
    # every other token and head is stored as it would have been (here: exactly, at 16 bits)
    if target == 16:
        k, v = written[1]
        mask = torch.ones(BS, H, dtype=torch.bool)
        mask[3, 2] = False
        assert torch.equal(key[0][mask], k[mask]) and torch.equal(value[0][mask], v[mask])


def test_sanitize_counts_only_changed_values():
    store = make_store(target=4)
    write_tokens(store, [2 * BS + i for i in range(BS)])
    slot = int(store.staging.slot_of_block[2])
    store.staging.value[0, slot, 0, 0, :3] = float("nan")
    assert store.sanitize_staged(torch.tensor([2])).tolist() == [3]
    assert store.sanitize_staged(torch.tensor([2])).tolist() == [0]


def test_release_and_capacity():
    staging = StagingArea(1, BLOCKS, BS, H, D, torch.bfloat16, max_slots=3)
    assert staging.assign(torch.tensor([4, 1, 4])).tolist() == [1, 0, 1]  # lowest free slots first
    staging.assign(torch.tensor([2]))
    with pytest.raises(StagingFullError, match="0 of 3 slots are free"):
        staging.assign(torch.tensor([3]))
    staging.release([4])
    assert staging.assign(torch.tensor([3])).item() == 1 and staging.peak == 3  # block 4 freed slot 1
    staging.release([1, 2, 3])
    assert staging.num_used == 0 and staging.peak == 3


@pytest.mark.parametrize("reserve", [8, 13, 72, 641])
def test_step_limits_keep_every_step_within_the_reserve(reserve):
    from adakv_vllm.blocks.staging import MIN_SLOTS, step_limits

    assert reserve >= MIN_SLOTS
    running, prefilling = 0, 0
    for _ in range(200):  # requests arrive every step, as many as allowed; a third keep prefilling
        tokens, admit = step_limits(
            reserve, running, prefilling, BS, max_tokens=4096, max_admit=256 - running
        )
        assert tokens >= BS and 0 <= admit <= 256 - running
        # the worst case the limits allow: every running request's partial block, every chunk's
        # blocks and the +1 of every chunk
        assert running + prefilling + admit + tokens / BS <= reserve or (admit == 0 and tokens == BS)
        running, prefilling = running + admit, (prefilling + admit) * 2 // 3
    assert running <= reserve


def test_features_are_per_token_relative_errors():
    store = make_store()
    store.begin_step()
    write_tokens(store, [BS * 4 + i for i in range(5)])
    feats = store.step_features()
    assert feats["slots"].tolist() == [BS * 4 + i for i in range(5)]
    qerr = feats["qerr"]
    assert qerr.shape == (5, 4)
    # error falls with bits: 2 > 3 > 4 > 8, and 2-bit error of gaussian data is ~0.33
    assert (qerr[:, :-1] > qerr[:, 1:]).all()
    assert ((qerr[:, 0] > 0.2) & (qerr[:, 0] < 0.5)).all()


def test_one_write_plan_per_step_and_none_across_a_release(monkeypatch):
    store = make_store()
    calls = []
    plan = store.staging.plan
    monkeypatch.setattr(store.staging, "plan", lambda mapping: calls.append(1) or plan(mapping))
    slots = [BS * 1 + i for i in range(3)]
    store.begin_step()
    write_tokens(store, slots)  # every layer, the same mapping
    assert len(calls) == 1
    store.release([1])  # the planned staging slot is freed ...
    written = write_tokens(store, slots, seed=1)  # ... so the same mapping is planned again
    assert len(calls) == 2 and store.staging.slot_of_block[1] >= 0
    key, _ = store.gather(LAYERS - 1, torch.tensor([1]))
    assert torch.equal(key[0, :3], written[-1][0])


def test_attention_inside_open_blocks_is_reported_when_a_block_fills():
    store = make_store(track_attention=True)
    gen = torch.Generator().manual_seed(0)
    for step, offsets in enumerate((range(0, 10), range(10, BS))):  # a block filled over two steps
        store.begin_step()
        slots = torch.tensor([3 * BS + i for i in offsets])
        write_tokens(store, slots.tolist(), seed=step)
        for layer in range(LAYERS):
            store.observe_attention(torch.randn(len(slots), 6, D, generator=gen), slots, 0.125, layer)
        done = store.completed_attention()
        assert (3 in done) == (step == 1)
    attention = torch.tensor(done[3])
    # each token's mean over the (layer, head, query) rows that saw it: the block's first query sees
    # only the first token (probability 1), one of the BS queries that see it
    assert attention.shape == (BS,) and attention[0].item() >= 1 / BS
    assert ((attention > 0) & (attention <= 1)).all()
    store.begin_step()
    assert make_store().completed_attention() == {}  # not tracked: nothing measured or reported


def test_attention_located_once_per_step_equals_each_layer_on_its_own(monkeypatch):
    """observe_attention locates the step's queries once and reuses it for every layer: the sums
    equal those of block_attention called per layer (prefill- and decode-shaped steps)."""
    from adakv_vllm.kernels import block_attention as ba

    store = make_store(track_attention=True)
    calls = []
    locate = ba.locate
    monkeypatch.setattr(ba, "locate", lambda *a: calls.append(1) or locate(*a))
    gen = torch.Generator().manual_seed(1)
    expected_received = torch.zeros_like(store.staging.received)
    expected_seen = torch.zeros_like(store.staging.seen)
    steps = ([2 * BS + i for i in range(12)] + [5 * BS + i for i in range(4)], [2 * BS + 12, 5 * BS + 4])
    for step, slots in enumerate(steps):
        store.begin_step()
        write_tokens(store, slots, seed=step)
        mapping = torch.tensor(slots + [-1])  # a padding row too
        for layer in range(LAYERS):
            query = torch.randn(len(slots) + 1, 6, D, generator=gen).bfloat16()  # the staging dtype
            store.observe_attention(query, mapping, 0.125, layer)
            unique, received, seen = ba.block_attention(
                query, store.staging.key[layer], store.staging.slot_of_block, mapping, BS, 0.125
            )
            expected_received.index_add_(0, unique, received)
            expected_seen.index_add_(0, unique, seen)
        # the store located once per step; block_attention (the per-layer form) once per call
        assert len(calls) == (step + 1) * (1 + LAYERS)
    torch.testing.assert_close(store.staging.received, expected_received, rtol=1e-5, atol=1e-6)
    assert torch.equal(store.staging.seen, expected_seen)


def test_attention_compiled_equals_the_torch_fallback(monkeypatch):
    """The store measures with the compiled kernel where the library builds, else with attend."""
    from adakv_vllm.kernels import library

    def run():
        store = make_store(track_attention=True)
        gen = torch.Generator().manual_seed(3)
        for step, slots in enumerate(([4 * BS + i for i in range(BS - 1)], [4 * BS + BS - 1])):
            store.begin_step()
            write_tokens(store, slots, seed=step)
            for layer in range(LAYERS):
                query = torch.randn(len(slots), 6, D, generator=gen).bfloat16()
                store.observe_attention(query, torch.tensor(slots), 0.125, layer)
        return store.completed_attention()

    compiled = run()
    assert library.load() is not None
    monkeypatch.setattr(library, "load", lambda: None)
    fallback = run()
    assert compiled.keys() == fallback.keys() == {4}
    torch.testing.assert_close(torch.tensor(compiled[4]), torch.tensor(fallback[4]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("waiting, tokens, active", [(1, 4096, 1), (0, 4096, 0), (300, 3712, 116)])
def test_admissions_hold_back_slots_only_for_waiting_requests(waiting, tokens, active):
    """233 slots (the default reserve at 4 GiB), an idle engine: one waiting prompt gets the whole
    token budget (one step for a 4096-token prompt, as stock), many share it with their admissions."""
    import types

    from adakv_vllm.engine.scheduler import AdaKVScheduler

    sched = types.SimpleNamespace(
        _configured_limits=(4096, 256),
        running=[],
        staging_slots=233,
        layout=types.SimpleNamespace(block_size=32),
        get_request_counts=lambda: (0, waiting),
    )
    AdaKVScheduler._fit_staging(sched)
    assert (sched.max_num_scheduled_tokens, sched.max_num_active_reqs) == (tokens, active)
