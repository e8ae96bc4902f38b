"""AdaKVAttentionImpl.forward outside an engine: which path serves which rows of a step.

Decode rows must come from the fused kernel in every step, mixed or not, so that a request's tokens
do not depend on whether other requests were prefilling beside it (the scratch path rounds K/V and
probabilities to bf16, the fused kernel keeps fp32: greedy near-ties flip between them).
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from vllm import _custom_ops as ops
from vllm.config import set_current_vllm_config
from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata, _get_attn_isa

from adakv_vllm.attention import runtime
from adakv_vllm.attention.backend import (
    SCRATCH_BLOCK_TOKENS,
    AdaKVAttentionImpl,
    fused_decode,
    gather_scratch,
    scheduler_metadata,
    split_step,
)
from adakv_vllm.blocks.spec import page_layout
from adakv_vllm.blocks.store import KVStore
from adakv_vllm.config import AdaKVConfig
from adakv_vllm.kernels import library
from adakv_vllm.kernels.attention_ref import paged_attention_ref

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE, DTYPE = 9, 3, 64, 32, torch.bfloat16
SCALE = HEAD_SIZE**-0.5
LAYER = 1  # not 0, whose forward also accounts the step's reads
ISA = _get_attn_isa(DTYPE, BLOCK_SIZE, HEAD_SIZE)

# (seq_len, query_len) per sequence, decodes and prefills interleaved as vLLM may order them:
# long contexts (several fused splits), a whole-prompt prefill, a chunked prefill over sealed pages.
MIXED = [(700, 1), (300, 300), (1500, 1), (520, 37), (40, 1)]


@pytest.fixture(scope="module")
def impl():
    if library.fused_kernel() is None:
        pytest.skip("the fused CPU kernel does not build here")
    # vLLM picks its AMX kernel for the scratch path where the CPU has AMX tiles; Linux lets a process
    # use them only after asking (arch_prctl). An engine has asked by the time attention runs (its
    # bf16 matmuls); this bare test asks itself. The plugin must not ask earlier than stock vLLM
    # would: that switches oneDNN's matmuls to AMX and changes stock's numerics (16 bits != stock).
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()
    config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(dtype=DTYPE),
        parallel_config=types.SimpleNamespace(decode_context_parallel_size=1),
    )
    with set_current_vllm_config(config):
        return AdaKVAttentionImpl(NUM_HEADS, HEAD_SIZE, SCALE, NUM_KV_HEADS, None, None, "auto")


@pytest.fixture(scope="module")
def step():
    """A KVStore holding MIXED's context (blocks before each query sealed at 4 bits, the rest staged),
    the step's query, and a metadata builder for any subset of MIXED."""
    gen = torch.Generator().manual_seed(0)
    layout = page_layout(BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, AdaKVConfig(target_bits=4, policy="static"))
    blocks = [-(-s // BLOCK_SIZE) for s, _ in MIXED]
    num_blocks = sum(blocks) + 2
    store = KVStore(layout, LAYER + 1, num_blocks, DTYPE, max_staging_slots=num_blocks)
    for layer in range(LAYER + 1):
        store.bind(layer, torch.zeros(num_blocks, layout.page_bytes, dtype=torch.uint8))
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(MIXED), max(blocks), dtype=torch.int32)
    to_seal = []
    start = 0
    for i, ((seq_len, q_len), nb) in enumerate(zip(MIXED, blocks, strict=True)):
        ids = perm[start : start + nb]
        start += nb
        table[i, :nb] = ids.to(torch.int32)
        slots = (ids[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).reshape(-1)[:seq_len]
        kv = torch.randn(2, seq_len, NUM_KV_HEADS, HEAD_SIZE, generator=gen).to(DTYPE)
        store.write(LAYER, slots, kv[0], kv[1])
        to_seal.append(ids[: (seq_len - q_len) // BLOCK_SIZE])  # full blocks before the query
    to_seal = torch.cat(to_seal)
    four = torch.full((to_seal.numel(), BLOCK_SIZE), 4)
    # seal() packs every layer: give layer 0 the same staged blocks so it has something to pack
    key, value = store.staging.read(LAYER, to_seal)
    for b, k, v in zip(to_seal.tolist(), key, value, strict=True):
        slots = b * BLOCK_SIZE + torch.arange(BLOCK_SIZE)
        store.write(0, slots, k, v)
    assert store.seal(to_seal, four, four) == []
    query = torch.randn(sum(q for _, q in MIXED), NUM_HEADS, HEAD_SIZE, generator=gen).to(DTYPE)

    def metadata(seqs: list[int]) -> tuple[CPUAttentionMetadata, torch.Tensor]:
        """-> the metadata of a step running only MIXED[seqs], and its rows of `query`."""
        qsl_all = torch.tensor([0] + [q for _, q in MIXED]).cumsum(0)
        rows = torch.cat([torch.arange(int(qsl_all[i]), int(qsl_all[i + 1])) for i in seqs])
        seq_lens = torch.tensor([MIXED[i][0] for i in seqs], dtype=torch.int32)
        qsl = torch.tensor([0] + [MIXED[i][1] for i in seqs], dtype=torch.int32).cumsum(0).to(torch.int32)
        sched = scheduler_metadata(NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, DTYPE, ISA, seq_lens, qsl)
        md = CPUAttentionMetadata(
            num_actual_tokens=rows.numel(),
            max_query_len=max(MIXED[i][1] for i in seqs),
            query_start_loc=qsl,
            max_seq_len=int(seq_lens.max()),
            seq_lens=seq_lens,
            block_table=table[seqs],
            slot_mapping=torch.zeros(rows.numel(), dtype=torch.int64),
            scheduler_metadata=sched,
        )
        return md, rows

    runtime.set_store(store)
    yield store, query, metadata
    runtime.set_store(None)


def _forward(impl, step, seqs):
    store, query, metadata = step
    md, rows = metadata(seqs)
    layer = types.SimpleNamespace(
        isa=ISA, _k_scale_float=1.0, _v_scale_float=1.0, layer_name=f"model.layers.{LAYER}.self_attn.attn"
    )
    out = torch.full((rows.numel() + 3, NUM_HEADS, HEAD_SIZE), 7.0, dtype=DTYPE)  # 3 padding rows
    q = torch.cat([query[rows], torch.zeros(3, NUM_HEADS, HEAD_SIZE, dtype=DTYPE)])
    impl.forward(layer, q, q, q, store.pages[LAYER], md, out)
    assert (out[rows.numel() :] == 7.0).all(), "padding rows must be left untouched"
    return out[: rows.numel()]


@pytest.mark.parametrize("order", ["interleaved", "decodes_first"])
def test_mixed_step_rows_equal_the_pure_steps(impl, step, order):
    decodes = [i for i, (_, q) in enumerate(MIXED) if q == 1]
    prefills = [i for i, (_, q) in enumerate(MIXED) if q > 1]
    everything = list(range(len(MIXED))) if order == "interleaved" else decodes + prefills
    metadata = step[2]
    # interleaved rows are gathered and scattered by index; consecutive ones go through views
    split = split_step(metadata(everything)[0], NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, DTYPE, ISA)
    kind = torch.Tensor if order == "interleaved" else slice
    assert isinstance(split.decode_rows, kind) and isinstance(split.prefill_rows, kind)
    mixed = _forward(impl, step, everything)
    pure_decode = _forward(impl, step, decodes)  # max_query_len 1: the fused kernel
    pure_prefill = _forward(impl, step, prefills)  # no decode rows: the scratch path
    position = {int(r): j for j, r in enumerate(metadata(everything)[1])}
    decode_rows = [position[int(r)] for r in metadata(decodes)[1]]
    prefill_rows = [position[int(r)] for r in metadata(prefills)[1]]
    # Bitwise: the same kernel on the same sequences, whatever else shares the step.
    assert torch.equal(mixed[decode_rows], pure_decode)
    assert torch.equal(mixed[prefill_rows], pure_prefill)


def test_mixed_step_matches_the_oracle(impl, step):
    store, query, metadata = step
    md, rows = metadata(list(range(len(MIXED))))
    out = _forward(impl, step, list(range(len(MIXED))))
    expected = paged_attention_ref(
        query[rows],
        store.pages[LAYER],
        store.staging.key[LAYER],
        store.staging.value[LAYER],
        store.staging.slot_of_block,
        md.block_table,
        md.seq_lens,
        md.query_start_loc,
        codec=store.codec,
        scale=SCALE,
    )
    # Outputs are bf16 (relative 2**-9); the scratch rows also round K/V and probabilities to bf16
    # inside vLLM's kernel: a few bf16 ulps of the output's scale (~1/sqrt(context) .. 1).
    torch.testing.assert_close(out.float(), expected, rtol=2**-6, atol=2**-7)


def test_pure_decode_step_measures_in_the_kernel_what_the_store_measures(impl, step):
    """With the `attention` policy on, a pure decode step takes the in-block measurement from the
    fused kernel's scores instead of KVStore.observe_attention: the same sums, up to rounding."""
    store, query, metadata = step
    decodes = [i for i, (_, q) in enumerate(MIXED) if q == 1]
    md, rows = metadata(decodes)
    table = md.block_table.to(torch.int64)
    positions = md.seq_lens.to(torch.int64) - 1
    blocks = table[torch.arange(len(decodes)), positions // BLOCK_SIZE]
    slot_mapping = blocks * BLOCK_SIZE + positions % BLOCK_SIZE
    staging = store.staging
    store.track_attention = True
    try:
        staging.received.zero_(), staging.seen.zero_()
        _forward(impl, step, decodes)
        fused = staging.received.clone(), staging.seen.clone()
        staging.received.zero_(), staging.seen.zero_()
        store.observe_attention(query[rows], slot_mapping, SCALE, LAYER)
        assert staging.seen.sum() > 0
        torch.testing.assert_close(fused[1], staging.seen, rtol=0, atol=0)
        torch.testing.assert_close(fused[0], staging.received, rtol=1e-5, atol=1e-5)
    finally:
        store.track_attention = False
        staging.received.zero_(), staging.seen.zero_()


def test_decode_is_prepared_once_per_step_and_again_for_a_layer_shaped_otherwise(impl, step):
    """The fused call a step's first layer prepares (cpu.DecodeStep) serves the step's other layers,
    which receive the same metadata object; a layer whose pages are strided otherwise prepares its
    own instead of failing. Every call gives what a fresh step gives."""
    store, query, metadata = step
    kernel = library.fused_kernel()
    decodes = [i for i, (_, q) in enumerate(MIXED) if q == 1]
    md, rows = metadata(decodes)
    q = query[rows]

    def decode(md, pages):
        store.pages[LAYER] = pages
        out = torch.zeros_like(q)
        fused_decode(kernel, store, LAYER, q, md, SCALE, out)
        return out, md.__dict__["_adakv_decode"][1]

    saved = store.pages[LAYER]
    wide = torch.zeros(saved.shape[0], saved.shape[1] + 64, dtype=torch.uint8)
    wide[:, : saved.shape[1]] = saved
    try:
        want, _ = decode(metadata(decodes)[0], saved)  # a fresh step
        first, prepared = decode(md, saved)
        again, reused = decode(md, saved)
        strided, own = decode(md, wide[:, : saved.shape[1]])  # the same bytes, rows further apart
    finally:
        store.pages[LAYER] = saved
    assert reused is prepared and own is not prepared
    for out in (first, again, strided):
        assert torch.equal(out, want)


@pytest.mark.parametrize("shared", [False, True])
def test_scratch_holds_each_sequences_pages_in_stock_format(step, shared, monkeypatch):
    """gather_scratch lays each sequence's pages, in order, into scratch blocks of its own
    (SCRATCH_BLOCK_TOKENS tokens, several pages), sealed pages decoded and staged blocks straight from
    staging's rows, in stock's cache format: at every token a sequence reads, the same bytes as
    writing that sequence's gathered K/V there in one call. shared: a fresh prompt also reads a sealed
    page and a staged block of another sequence (a prefix hit inside the step); each gets a copy."""
    store, _query, metadata = step
    md, _rows = metadata(list(range(len(MIXED))))
    pages = [-(-s // BLOCK_SIZE) for s, _ in MIXED]
    if shared:
        table = md.block_table.clone()
        table[1, 0], table[1, 2] = table[3, 0], table[3, pages[3] - 1]
        md = dataclasses.replace(md, block_table=table)
        assert store.sealed[table[3, 0]] and not store.sealed[table[3, pages[3] - 1]]
    empty = torch.empty

    def poisoned(*args, **kwargs):  # whatever gather_scratch leaves unwritten reads 1234, not old bytes
        out = empty(*args, **kwargs)
        return out.fill_(1234) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned)
    scratch, remapped = gather_scratch(store, LAYER, md, ISA)
    monkeypatch.undo()
    u, span = scratch.shape[0], scratch.shape[2]
    assert span == SCRATCH_BLOCK_TOKENS  # BLOCK_SIZE divides it
    own = [remapped[i, : -(-n * BLOCK_SIZE // span)].long() for i, n in enumerate(pages)]
    assert torch.equal(torch.cat(own).sort().values, torch.arange(u))  # every sequence its own blocks
    read = torch.cat([md.block_table[i, :n] for i, n in enumerate(pages)]).long()
    assert store.sealed[read].any() and not store.sealed[read].all()  # both kinds
    expected = scratch.clone().view(u, NUM_KV_HEADS, 2 * span, HEAD_SIZE)
    key_cache, value_cache = expected.chunk(2, dim=2)
    for i, n in enumerate(pages):
        key, value = store.gather(LAYER, md.block_table[i, :n].long())  # [n, bs, H, D] sealed or staged
        to = (own[i][:, None] * span + torch.arange(span)).flatten()[: n * BLOCK_SIZE]
        ops.cpu_attn_reshape_and_cache(
            key.flatten(0, 1), value.flatten(0, 1), key_cache, value_cache, to, ISA
        )
    # bitwise: positions past a sequence's end hold whatever staging held (uninitialised, maybe NaN)
    assert torch.equal(scratch.view(expected.shape).view(torch.int16), expected.view(torch.int16))


def test_unwritten_scratch_is_never_read(impl, step, monkeypatch):
    """A sequence's last scratch block can hold pages past its end that nothing writes (besides the
    tokens past its end in its last page). Allocated as NaN, they leave every output row equal to the
    oracle's: vLLM's kernel reads no token past a sequence's length."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned)
    test_mixed_step_matches_the_oracle(impl, step)
