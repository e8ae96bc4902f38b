"""The Triton decode kernel (kernels/triton_decode.py) against the fp32 oracle paged_attention_ref.

Without a GPU the kernel runs under Triton's interpreter. TRITON_INTERPRET is read when a function
is decorated with @triton.jit, and Triton's own library functions (tl.sum, tl.max, ...) are
decorated when `triton` is first imported: once any module of this pytest process (vLLM, another
test) has imported triton without it, interpreted kernels fail. So `test_under_interpreter` runs
this file again in a fresh process with TRITON_INTERPRET=1, where the parametrized cases run on
CPU; in this process they run natively when a GPU is present and are skipped otherwise.
`test_kernels_compile_for_hopper` compiles the real decode and seal launches for sm_90 (no GPU
needed), catching what only the compiler rejects. `test_fwht_rows_is_the_oracles_butterflies` pins the
in-kernel rotation to quant/rotation.py bit for bit.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adakv_vllm.kernels.attention_ref import paged_attention_ref
from adakv_vllm.kernels.page_codec import PageCodec
from adakv_vllm.quant import format as fmt
from adakv_vllm.quant.precision import ALL_BITS
from adakv_vllm.quant.rotation import fwht

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
fwht_rows = importlib.import_module("adakv_vllm.kernels.triton_decode").fwht_rows  # _fwht_kernel's callee

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else ("cuda" if torch.cuda.is_available() else None)
needs_kernel = pytest.mark.skipif(
    DEVICE is None, reason="no GPU: these cases run in the TRITON_INTERPRET=1 child (test_under_interpreter)"
)

# (output dtype) -> (rtol, atol) against the fp32 oracle; outputs are ~N(0, 1/sqrt(context)).
TOLERANCES = {
    # fp32 out: summation order (split-K merge, per-block online softmax), exp, and the rotation
    # moved onto the query and the value sum (the oracle unrotates each record) differ from the
    # oracle; each is a few fp32 ulps.
    torch.float32: (1e-5, 2e-6),
    # bf16 out: one final rounding to bf16 (relative 2**-9) dominates everything else; Triton 3.9's
    # interpreter truncates fp32 -> bf16 instead of rounding to nearest (relative < 2**-7).
    torch.bfloat16: (2**-7 if INTERPRETED else 2**-8, 1e-5),
    # fp16 out: one final rounding (relative 2**-11), plus the fp32 slack above.
    torch.float16: (2**-10, 1e-5),
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    seq_lens: tuple[int, ...]
    query_lens: tuple[int, ...] | None = None  # default: 1 per sequence (decode)
    bits: str = "mixed"  # a BIT_CHOICES key (key and value drawn independently) or one of ALL_BITS
    open_blocks: str = "last"  # "last" (each sequence's last block), "none", "all", "random"
    num_heads: int = 9  # SmolLM2: GQA 9:3
    num_kv_heads: int = 3
    head_size: int = 64
    group_size: int = 32
    block_size: int = 32
    storage: torch.dtype = torch.bfloat16
    query_dtype: torch.dtype = torch.float32
    num_splits: int | None = None


# bits drawn per token ("mixed": every precision; "low": the Gaussian codebooks only)
BIT_CHOICES = {"mixed": ALL_BITS, "low": (2, 3, 4)}
CASES = [
    Case("seq_len_1_staged", (1,)),
    Case("seq_len_1_sealed", (1,), open_blocks="none"),
    Case("odd_lengths", (33, 67, 5)),
    Case("partial_last_block_sealed", (45, 77), open_blocks="none"),
    Case("staged_and_sealed_random", (150, 97), open_blocks="random"),
    Case("all_staged", (70, 40), open_blocks="all"),
    Case("all_2_bit", (100, 64), bits="2", open_blocks="none"),
    Case("all_3_bit", (70, 33), bits="3", open_blocks="none"),
    Case("low_bits", (90, 20), bits="low"),
    Case("all_8_bit", (70,), bits="8"),
    Case("all_16_bit", (100, 33), bits="16", open_blocks="none"),
    Case("mha", (70, 51), num_heads=4, num_kv_heads=4),
    Case("gqa_4_to_1", (40, 9), num_heads=8, num_kv_heads=2),
    Case("head_80_hadamard_16", (60, 21), head_size=80, group_size=16),
    # Hadamard blocks of 128 and 32: rotate != unrotate, so the query must be unrotated, not rotated
    Case("head_128_group_64", (50, 17), num_heads=4, num_kv_heads=2, head_size=128, group_size=64),
    Case("head_96_padded", (40,), num_heads=6, num_kv_heads=2, head_size=96, block_size=16),
    Case("fp16_storage", (64, 61), storage=torch.float16),
    Case("bf16_query_and_out", (100, 17), query_dtype=torch.bfloat16),
    Case("fp16_query_and_out", (100, 17), storage=torch.float16, query_dtype=torch.float16),
    Case("splits_some_empty", (260, 1, 40), num_splits=3, open_blocks="random"),
    Case("one_split", (200,), num_splits=1),
    Case("odd_block_size", (60, 18), block_size=17, group_size=16),
    Case("prefill_and_decode_mixed", (40, 70, 33), query_lens=(4, 1, 3)),
    Case("idle_sequence", (50, 30), query_lens=(0, 1)),
]
# every supported head size (its Hadamard block, padded groups) at an odd block size, mixed bits
SWEEP = [
    Case(f"sweep_h{d}_g{g}", (37, 20), num_heads=4, num_kv_heads=2, head_size=d, group_size=g, block_size=9)
    for d in range(32, 257, 16)
    for g in (16, 32, 64)
    if d % g == 0 and g * 2 <= d
]


def _bits(case: Case, layout: fmt.PageLayout, n: int, gen: torch.Generator):
    """[n, block_size] key and value bits (pages are sized for all-16-bit, so any bits fit)."""
    t = layout.block_size
    if case.bits not in BIT_CHOICES:
        b = torch.full((n, t), int(case.bits))
        return b, b.clone()
    choices = torch.tensor(BIT_CHOICES[case.bits])
    return (
        choices[torch.randint(0, choices.numel(), (n, t), generator=gen)],
        choices[torch.randint(0, choices.numel(), (n, t), generator=gen)],
    )


def _problem(case: Case, seed: int = 0):
    """-> (the oracle's keyword arguments, codec). Shuffled block table with poisoned padding,
    open blocks whose pages hold garbage, two padding query tokens at the end."""
    gen = torch.Generator().manual_seed(seed)
    bs, h, d = case.block_size, case.num_kv_heads, case.head_size
    record = fmt.RecordLayout(d, case.group_size)
    layout = fmt.PageLayout(bs, h, record, fmt.page_bytes_for_target(bs, h, record, 16, 16))
    codec = PageCodec(layout, case.storage)
    query_lens = torch.tensor(case.query_lens or [1] * len(case.seq_lens), dtype=torch.int32)
    blocks_per_seq = [(s + bs - 1) // bs for s in case.seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks nobody reads
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = torch.full((len(case.seq_lens) + 1, max(blocks_per_seq) + 2), 10**6, dtype=torch.int32)
    last, i = set(), 0
    for s, nb in enumerate(blocks_per_seq):
        block_table[s, :nb] = perm[i : i + nb].to(torch.int32)
        last.add(int(perm[i + nb - 1]))
        i += nb
    key = torch.randn(num_blocks, bs, h, d, generator=gen)
    key[..., :3] *= 6  # a few outlier channels, as real keys have
    key = key.to(case.storage)
    value = torch.randn(num_blocks, bs, h, d, generator=gen).to(case.storage)
    pages = codec.encode(key, value, *_bits(case, layout, num_blocks, gen))
    open_mask = {
        "all": torch.ones(num_blocks, dtype=torch.bool),
        "none": torch.zeros(num_blocks, dtype=torch.bool),
        "last": torch.tensor([b in last for b in range(num_blocks)]),
        "random": torch.rand(num_blocks, generator=gen) < 0.4,
    }[case.open_blocks]
    num_slots = int(open_mask.sum()) + 2
    staging_key = torch.randn(num_slots, bs, h, d, generator=gen).to(case.storage)
    staging_value = torch.randn(num_slots, bs, h, d, generator=gen).to(case.storage)
    staging_slot = torch.full((num_blocks,), -1, dtype=torch.int64)
    slots = torch.randperm(num_slots, generator=gen)
    for j, b in enumerate(open_mask.nonzero().flatten().tolist()):
        staging_slot[b] = slots[j]
        staging_key[slots[j]], staging_value[slots[j]] = key[b], value[b]
        pages[b] = torch.randint(0, 256, (layout.page_bytes,), generator=gen, dtype=torch.uint8)
    query_start_loc = torch.zeros(len(case.seq_lens) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(query_lens, 0)
    num_tokens = int(query_start_loc[-1]) + 2
    query = torch.randn(num_tokens, case.num_heads, d, generator=gen).to(case.query_dtype)
    args = {
        "query": query,
        "pages": pages,
        "staging_key": staging_key,
        "staging_value": staging_value,
        "staging_slot": staging_slot,
        "block_table": block_table,
        "seq_lens": torch.tensor(case.seq_lens, dtype=torch.int32),
        "query_start_loc": query_start_loc,
    }
    return args, codec


def _kernel():
    return importlib.import_module("adakv_vllm.kernels.triton_decode")


@triton.jit
def _fwht_kernel(
    x_ptr, out_ptr, ROWS: tl.constexpr, HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr, LOG_BLOCK: tl.constexpr
):
    r = tl.arange(0, ROWS)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    x = tl.load(x_ptr + r * HEAD_SIZE + d, mask=d < HEAD_SIZE, other=0.0)
    tl.store(out_ptr + r * HEAD_SIZE + d, fwht_rows(x, ROWS, D_PAD, LOG_BLOCK), mask=d < HEAD_SIZE)


@needs_kernel
@pytest.mark.parametrize("head_size", [32, 48, 64, 80, 96, 128, 256])
def test_fwht_rows_is_the_oracles_butterflies(head_size):
    """The in-kernel transform (query and value-sum rotation) equals rotation.fwht bit for bit, on
    rows whose entries span 2**-30..2**30 so that every sum rounds and order would show."""
    gen = torch.Generator().manual_seed(head_size)
    x = torch.randn(4, head_size, generator=gen) * 2.0 ** torch.randint(
        -30, 30, (4, head_size), generator=gen
    )
    out = torch.full_like(x, float("nan")).to(DEVICE)
    log_block = _kernel().rotation_constexprs(head_size)["LOG_BLOCK"]
    d_pad = triton.next_power_of_2(head_size)
    _fwht_kernel[(1,)](x.to(DEVICE), out, ROWS=4, HEAD_SIZE=head_size, D_PAD=d_pad, LOG_BLOCK=log_block)
    assert torch.equal(out.cpu(), fwht(x))


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_matches_oracle(case):
    _check(case)


@needs_kernel
@pytest.mark.slow
@pytest.mark.parametrize("case", SWEEP, ids=lambda c: c.name)
def test_kernel_matches_oracle_sweep(case):
    _check(case)


def _check(case: Case) -> None:
    args, codec = _problem(case)
    scale = case.head_size**-0.5
    expected = paged_attention_ref(**args, codec=codec, scale=scale)
    on_device = {k: v.to(DEVICE) for k, v in args.items()}
    sentinel = 123.0
    out = torch.full_like(on_device["query"], sentinel)
    _kernel().paged_attention_triton(
        **on_device, codec=codec, scale=scale, out=out, num_splits=case.num_splits
    )
    owned = int(args["query_start_loc"][-1])
    rtol, atol = TOLERANCES[case.query_dtype]
    torch.testing.assert_close(out[:owned].float().cpu(), expected[:owned], rtol=rtol, atol=atol)
    assert (out[owned:] == sentinel).all(), "padding tokens must be left untouched"


@needs_kernel
def test_split_count_does_not_change_the_result():
    args, codec = _problem(Case("splits", (160, 65), open_blocks="random"), seed=3)
    args = {k: v.to(DEVICE) for k, v in args.items()}
    owned = int(args["query_start_loc"][-1])
    outs = [
        _kernel().paged_attention_triton(**args, codec=codec, scale=0.125, num_splits=s)[:owned]
        for s in (1, 2, 5)
    ]
    rtol, atol = TOLERANCES[torch.float32]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {**a, "query": a["query"][..., :32]}, "head_size must be the layout's 64"),
        (lambda a: {**a, "query": a["query"][:, :8]}, "multiple of num_kv_heads"),
        (lambda a: {**a, "query": a["query"].to(torch.float64)}, "fp16/bf16/fp32"),
        (lambda a: {**a, "pages": a["pages"].to(torch.int16)}, "pages must be uint8"),
        (lambda a: {**a, "staging_key": a["staging_key"].float()}, "staging_key dtype must be one of"),
        (lambda a: {**a, "staging_slot": a["staging_slot"].int()}, "staging_slot must be int64"),
        (lambda a: {**a, "seq_lens": a["seq_lens"].float()}, "seq_lens must be int32 or int64"),
        (lambda a: {**a, "query_start_loc": a["query_start_loc"][:-1]}, "query_start_loc"),
    ],
    ids=[
        "head_size",
        "heads",
        "query_dtype",
        "pages_dtype",
        "staging_dtype",
        "slot_dtype",
        "seq_lens",
        "qsl",
    ],
)
def test_invalid_inputs_raise_value_error(change, match):
    args, codec = _problem(Case("v", (40,)))
    with pytest.raises(ValueError, match=match):
        _kernel().paged_attention_triton(**change(args), codec=codec, scale=1.0)


_POINTER_TYPES = {
    torch.uint8: "*u8",
    torch.int16: "*i16",
    torch.int32: "*i32",
    torch.int64: "*i64",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float32: "*fp32",
}


class _Capture:
    """Stands in for a @triton.jit kernel: records the arguments of a launch instead of running it."""

    def __init__(self, kernel):
        self.kernel, self.arg_names, self.launches = kernel, kernel.arg_names, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def _compile_for_hopper(kernel, args, kwargs) -> None:
    """Compile one captured launch for sm_90 (Triton's bundled ptxas; no GPU needed)."""
    from triton.backends.compiler import GPUTarget

    constexprs = {k: v for k, v in kwargs.items() if k in kernel.arg_names}
    options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}  # num_warps, ...
    signature = {
        name: _POINTER_TYPES[v.dtype]
        if isinstance(v, torch.Tensor)
        else ("fp32" if isinstance(v, float) else "i32")
        for name, v in zip(kernel.arg_names, args, strict=False)
    }
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.skipif(INTERPRETED, reason="compiles the real kernels; the interpreter has none")
def test_kernels_compile_for_hopper(monkeypatch):
    """GPU-only failures (globals that are not constexpr, shape or type rules the interpreter does
    not enforce) surface here without a GPU: compile SmolLM2's decode and seal launches for sm_90."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    decode = _kernel()
    seal = importlib.import_module("adakv_vllm.kernels.triton_seal")
    captures = [
        (decode, "_split_kernel"),
        (decode, "_reduce_kernel"),
        (seal, "_seal_kernel"),
    ]
    for module, name in captures:
        monkeypatch.setattr(module, name, _Capture(getattr(module, name)))
    args, codec = _problem(Case("smollm2", (70, 5), query_dtype=torch.bfloat16))
    decode.paged_attention_triton(**args, codec=codec, scale=0.125, out=torch.empty_like(args["query"]))
    kv = args["staging_key"][:1], args["staging_value"][:1]
    bits = torch.tensor(ALL_BITS).repeat(7)[None, :32]  # [1, 32]: every precision
    seal.seal_pages(codec, *kv, bits, bits.flip(1))
    for module, name in captures:
        capture = getattr(module, name)
        _compile_for_hopper(capture.kernel, *capture.launches[0])


def test_under_interpreter(request):
    """Run this file's kernel cases on CPU in a fresh process with TRITON_INTERPRET=1."""
    if INTERPRETED:
        pytest.skip("this is the interpreted child")
    _run_interpreted(__file__, request.config.option.markexpr)


def _run_interpreted(path: str, markexpr: str) -> None:
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path]
    if markexpr:
        cmd += ["-m", markexpr]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"interpreted run failed:\n{done.stdout[-8000:]}\n{done.stderr[-4000:]}"
