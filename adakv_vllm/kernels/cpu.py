"""Launchers of the compiled CPU kernels (kernels/library.py builds and loads them).

  paged_attention   csrc/cpu_decode.cpp, oracle kernels/attention_ref.paged_attention_ref
  DecodeStep        the same, prepared once for the layers of a step
  encode_pages      csrc/cpu_seal.cpp, oracle kernels/page_codec.PageCodec.encode (the same bytes)
  decode_pages      csrc/cpu_unpack.cpp, oracle kernels/page_codec.PageCodec.decode (the same bits
                    once in the storage dtype)
  relative_errors   csrc/cpu_qerr.cpp, oracle quant.reference.relative_errors
  block_attention   csrc/cpu_block_attn.cpp, oracle kernels/block_attention.attend
  plan_pages        csrc/cpu_plan.cpp, oracle blocks/planner.allocate (page by page; the same bits)
  StageRows         csrc/cpu_stage.cpp, oracle blocks/staging.StagingArea.write_planned's torch form

`paged_attention(...)` computes the oracle's contract straight from the packed pages (no dequantized
copy of the context): causal, any query_len, GQA, mixed 2/3/4/8/16-bit records, open blocks read from
FP16 staging; quantized keys are dotted with the rotated query and quantized values accumulate in the
rotated space, rotated back once per query row (cpu_decode.cpp). The backend uses it for every decode
row (mixed steps included); prefill rows keep the scratch path, whose GEMM-shaped kernel suits many
queries per key (benchmarks/attention_micro.py --query-len 512 compares them); `decode_pages` writes
that path's plain copy of the sealed pages.

Layout numbers come from `quant.format` and `quant.rotation` (`layout_numbers`), the codebooks from
`quant.levels` (`codebooks`); the C++ only applies format.py's documented packing rules and the
oracle's quantizer steps.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from adakv_vllm.kernels.library import (
    DTYPE_CODES,
    LANE_LEVELS,
    LAYOUT_NUMBERS,
    MAX_CLIP_FACTORS,
    MAX_LEVELS,
    BlockAttnArgs,
    Codebooks,
    DecodeArgs,
    Kernel,
    QerrArgs,
    SealArgs,
    UnpackArgs,
    build,
)
from adakv_vllm.quant import format as fmt
from adakv_vllm.quant import levels
from adakv_vllm.quant.precision import PRECISIONS, Precision
from adakv_vllm.quant.reference import MAX_QUANTIZED_ABS, MAX_ROTATED_ABS
from adakv_vllm.quant.rotation import scale_exponents

QUERY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


@functools.cache
def layout_numbers(layout: fmt.PageLayout, storage_dtype: torch.dtype) -> tuple[int, ...]:
    """The sizes the C++ kernels read (csrc/cpu_layout.h: PageNumbers), from quant.format and
    quant.rotation: block_size, group_size, header_bytes, page_bytes, storage_is_bf16, the rotation's
    (k, m), then per precision code (PRECISIONS order) record_bytes, scales_offset (0 at 16 bits), bits.
    """
    rec = layout.record
    if [p.code for p in PRECISIONS] != list(range(len(PRECISIONS))) or PRECISIONS[-1].is_quantized:
        raise AssertionError("the kernels assume codes 0..4 with the 16-bit precision last")
    numbers = (
        layout.block_size,
        rec.group_size,
        layout.header_bytes,
        layout.page_bytes,
        int(storage_dtype == torch.bfloat16),
        *scale_exponents(rec.head_size),
        *(rec.record_bytes(p) for p in PRECISIONS),
        *(rec.scales_offset(p) if p.is_quantized else 0 for p in PRECISIONS),
        *(p.bits for p in PRECISIONS),
    )
    assert len(numbers) == LAYOUT_NUMBERS
    return numbers


@functools.cache
def _layout_array(layout: fmt.PageLayout, storage_dtype: torch.dtype):
    return (ctypes.c_int64 * LAYOUT_NUMBERS)(*layout_numbers(layout, storage_dtype))


@functools.cache
def codebooks() -> Codebooks:
    """quant.levels' tables as the kernels read them (csrc/cpu_quant.h: Codebooks), one per quantized
    precision code; cached, so its address stays valid for every call."""
    books = Codebooks()
    for p in PRECISIONS:
        if not p.is_quantized:
            continue
        lv, thresholds, factors = (
            t[p.bits].to(torch.float32) for t in (levels.LEVELS, levels.THRESHOLDS, levels.CLIP_FACTORS)
        )
        # the kernels' capacities: the clip search takes one SIMD lane per factor and keeps the
        # codebook in one register (LANE_LEVELS); a larger codebook has a single clip factor
        if not (lv.numel() <= MAX_LEVELS and factors.numel() <= MAX_CLIP_FACTORS):
            raise AssertionError(f"the {p.bits}-bit codebook exceeds the kernels' tables")
        if factors.numel() > 1 and lv.numel() > LANE_LEVELS:
            raise AssertionError(
                f"the {p.bits}-bit codebook is searched over clip factors but has > 16 levels"
            )
        # the search's fp32 pass codes |y| in the positive half (cpu_quant.h: symmetric_search_ok)
        if factors.numel() > 1 and not torch.equal(lv, -lv.flip(0)):
            raise AssertionError(f"the {p.bits}-bit codebook is searched over clip factors but not symmetric")
        # and the decode kernel reads a larger codebook as the exact grid base + code * step
        grid = lv[0].double() + torch.arange(lv.numel()).double() * (lv[1] - lv[0]).double()
        if lv.numel() > LANE_LEVELS and not torch.equal(grid, lv.double()):
            raise AssertionError(f"the {p.bits}-bit codebook is not an exact fp32 grid")
        book = books.code[p.code]
        book.num_levels = lv.numel()
        book.num_clip_factors = factors.numel()
        book.zero_code = levels.zero_code(p.bits)
        book.levels[: lv.numel()] = lv.tolist()
        padded = torch.full((MAX_LEVELS,), float("inf"))  # a 16-lane register reads past the last one
        padded[: thresholds.numel()] = thresholds
        book.thresholds[:] = padded.tolist()
        book.clip_factors[: factors.numel()] = factors.tolist()
    return books


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size] bf16/fp16/fp32, last dim contiguous
    pages: torch.Tensor,  # [num_blocks, >= page_bytes] uint8 (one layer), rows may be strided
    staging_key: torch.Tensor,  # [num_slots, block_size, num_kv_heads, head_size] 16-bit
    staging_value: torch.Tensor,  # [num_slots, block_size, num_kv_heads, head_size] 16-bit
    staging_slot: torch.Tensor,  # [num_blocks] int64, -1 = sealed (read the page)
    block_table: torch.Tensor,  # [>= num_seqs, max_blocks] int32/int64
    seq_lens: torch.Tensor,  # [num_seqs] int32/int64
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32/int64
    layout: fmt.PageLayout,
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_size], last dim contiguous
    module: Kernel | None = None,
    pages_per_split: int = 0,
    force_scalar: bool = False,
    received: torch.Tensor | None = None,  # [num_slots, block_size] fp32, added to
    seen: torch.Tensor | None = None,  # [num_slots, block_size] fp32, added to
) -> torch.Tensor:
    """paged_attention_ref's contract, fused. Writes (and returns) `out` for the tokens that belong
    to a sequence; other rows of `out` are left as they were. `module`: the built Kernel
    (default: build/load it now). pages_per_split: pages per work item, 0 = the kernel's choice.
    force_scalar: run the portable path even where the AVX-512 one is compiled in (tests).
    received, seen: also take the `attention` policy's in-block measurement of this layer
    (kernels/block_attention.py's `attend` and `locate.seen`, for queries whose own block is staged)
    from the same scores, adding into them in place (the store's `staging.received` / `.seen`).
    One call; DecodeStep prepares the same call once for every layer of a step."""
    if out is None and query.dim() == 3:
        out = torch.zeros_like(query)
    tensors = (query, out, pages, staging_key.contiguous(), staging_value.contiguous(), received, seen)
    sequences = (staging_slot, block_table, seq_lens, query_start_loc)
    step = DecodeStep(*tensors, *sequences, layout, scale, module, pages_per_split, force_scalar)
    return step(*tensors)


class StepMismatch(ValueError):
    """A DecodeStep called with tensors shaped unlike those it was prepared with."""


def _signature(t: torch.Tensor | None):
    return None if t is None else (t.shape, t.stride(), t.dtype)


class DecodeStep:
    """paged_attention prepared for one step: the step's sequences (staging slot map, block table,
    lengths, query starts), the layout and one layer's tensors are checked and laid into the kernel's
    arguments once; each call passes a layer's tensors, which must have the shapes, strides and
    dtypes of those it was prepared with (StepMismatch otherwise), and runs the kernel. A decode step
    calls it once per layer, where paged_attention's checks cost ~18 us, an eighth of the kernel's
    time at 8 sequences x 640 tokens. The sequence tensors are read when the kernel runs (the caller
    keeps them alive and unchanged during the step)."""

    def __init__(
        self,
        query: torch.Tensor,  # as paged_attention's
        out: torch.Tensor,
        pages: torch.Tensor,
        staging_key: torch.Tensor,  # contiguous
        staging_value: torch.Tensor,  # contiguous
        received: torch.Tensor | None,
        seen: torch.Tensor | None,
        staging_slot: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        query_start_loc: torch.Tensor,
        layout: fmt.PageLayout,
        scale: float,
        module: Kernel | None = None,
        pages_per_split: int = 0,
        force_scalar: bool = False,
    ):
        if query.dim() != 3 or query.dtype not in QUERY_DTYPES or query.stride(-1) != 1:
            raise ValueError(
                f"query must be [num_tokens, num_heads, head_size] in {QUERY_DTYPES} with a contiguous "
                f"last dim, got {list(query.shape)} {query.dtype}"
            )
        num_heads, head_size = query.shape[1], query.shape[2]
        kv_shape = (layout.block_size, layout.num_kv_heads, layout.record.head_size)
        if staging_key.dtype not in fmt.STORAGE_DTYPES or staging_key.dtype != staging_value.dtype:
            raise ValueError(f"staging must be one of {fmt.STORAGE_DTYPES}, got {staging_key.dtype}")
        if tuple(staging_key.shape[1:]) != kv_shape or staging_value.shape != staging_key.shape:
            raise ValueError(f"staging must be [num_slots, *{kv_shape}], got {list(staging_key.shape)}")
        if not (staging_key.is_contiguous() and staging_value.is_contiguous()):
            raise ValueError("staging must be contiguous")
        if head_size != layout.record.head_size or num_heads % layout.num_kv_heads:
            raise ValueError(
                f"query heads/head_size {num_heads}/{head_size} do not fit {layout.num_kv_heads} KV heads "
                f"of head_size {layout.record.head_size}"
            )
        if pages.dtype != torch.uint8 or pages.dim() != 2 or pages.shape[1] < layout.page_bytes:
            raise ValueError(
                f"pages must be [num_blocks, >= {layout.page_bytes}] uint8, got {list(pages.shape)}"
            )
        if staging_slot.dtype != torch.int64 or staging_slot.shape != (pages.shape[0],):
            raise ValueError(f"staging_slot must be [{pages.shape[0]}] int64, got {list(staging_slot.shape)}")
        for name, t in (
            ("block_table", block_table),
            ("seq_lens", seq_lens),
            ("query_start_loc", query_start_loc),
        ):
            if t.dtype not in INDEX_DTYPES:
                raise ValueError(f"{name} must be one of {INDEX_DTYPES}, got {t.dtype}")
        if out.shape != query.shape or out.stride(-1) != 1 or out.dtype not in QUERY_DTYPES:
            raise ValueError(
                f"out must be {list(query.shape)} in {QUERY_DTYPES}, got {list(out.shape)} {out.dtype}"
            )
        if block_table.dim() != 2 or block_table.shape[0] < seq_lens.numel():
            raise ValueError(
                f"block_table must be [>= {seq_lens.numel()}, max_blocks], got {list(block_table.shape)}"
            )
        if query_start_loc.shape != (seq_lens.numel() + 1,):
            raise ValueError(
                f"query_start_loc must be [{seq_lens.numel() + 1}], got {list(query_start_loc.shape)}"
            )
        if pages.stride(1) != 1:
            raise ValueError("pages rows must be contiguous")
        if (received is None) != (seen is None):
            raise ValueError("received and seen go together")
        expected = (staging_key.shape[0], layout.block_size)
        for name, t in (("received", received), ("seen", seen)):
            if t is None or (t.dtype == torch.float32 and tuple(t.shape) == expected and t.is_contiguous()):
                continue
            raise ValueError(
                f"{name} must be a contiguous {list(expected)} float32 tensor, got {list(t.shape)} {t.dtype}"
            )
        self._signatures = tuple(
            map(_signature, (query, out, pages, staging_key, staging_value, received, seen))
        )
        # kept alive for the kernel's pointers
        self._block_table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
        self._seq_lens, self._query_start_loc = seq_lens.contiguous(), query_start_loc.contiguous()
        self._staging_slot = staging_slot.contiguous()
        self._kernel = module if module is not None else build()
        self._args = DecodeArgs(
            _layout_array(layout, staging_key.dtype),
            ctypes.addressof(codebooks()),
            head_size,
            num_heads,
            layout.num_kv_heads,
            query.shape[0],
            seq_lens.numel(),
            pages.shape[0],
            staging_key.shape[0],
            None,  # pages: per call
            pages.stride(0),
            None,  # staging_key, staging_value: per call
            None,
            self._staging_slot.data_ptr(),
            self._block_table.data_ptr(),
            block_table.dtype == torch.int64,
            self._block_table.stride(0),
            block_table.shape[1],
            self._seq_lens.data_ptr(),
            self._query_start_loc.data_ptr(),
            seq_lens.dtype == torch.int64,
            query_start_loc.dtype == torch.int64,
            None,  # query: per call
            DTYPE_CODES[query.dtype],
            query.stride(0),
            query.stride(1),
            None,  # out: per call
            DTYPE_CODES[out.dtype],
            out.stride(0),
            out.stride(1),
            float(scale),
            int(pages_per_split),
            int(force_scalar),
            torch.get_num_threads(),
            None,  # received, seen: per call
            None,
        )

    def __call__(
        self,
        query: torch.Tensor,
        out: torch.Tensor,
        pages: torch.Tensor,
        staging_key: torch.Tensor,
        staging_value: torch.Tensor,
        received: torch.Tensor | None = None,
        seen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One layer's attention into `out` (returned), as paged_attention."""
        tensors = (query, out, pages, staging_key, staging_value, received, seen)
        if tuple(map(_signature, tensors)) != self._signatures:
            raise StepMismatch(
                "query, out, pages, staging, received and seen must have the shapes, strides and dtypes "
                "of the tensors the step was prepared with"
            )
        args = self._args
        args.query, args.out, args.pages = query.data_ptr(), out.data_ptr(), pages.data_ptr()
        args.staging_key, args.staging_value = staging_key.data_ptr(), staging_value.data_ptr()
        args.received = None if received is None else received.data_ptr()
        args.seen = None if seen is None else seen.data_ptr()
        self._kernel.run(args)
        return out


def relative_errors(x: torch.Tensor, precisions, group_size: int, module: Kernel) -> torch.Tensor:
    """quant.reference.relative_errors (the oracle), fused: x [T, H, D] -> [T, P] fp32, each token's
    mean over heads of ||y - stored_p(y)|| / ||y|| with y the clamped, rotated row. Raises ValueError
    as the oracle does: a NaN, or a rotated value beyond +-MAX_ROTATED_ABS."""
    if x.dim() != 3 or not torch.is_floating_point(x):
        raise ValueError(
            f"x must be [num_tokens, num_kv_heads, head_size] floats, got {list(x.shape)} {x.dtype}"
        )
    t, h, d = x.shape
    k, m = scale_exponents(d)  # ValueError on an unsupported head_size
    if d % group_size:
        raise ValueError(f"head_size {d} is not a multiple of group_size {group_size}")
    precisions = [Precision.parse(p) for p in precisions]
    if not all(p.is_quantized for p in precisions):
        raise ValueError(
            f"precisions must be quantized ({[p.bits for p in PRECISIONS[:-1]]}), got {precisions}"
        )
    x = (x if x.dtype in DTYPE_CODES else x.float()).contiguous()
    codes = torch.tensor([p.code for p in precisions], dtype=torch.int64)
    bits = torch.tensor([p.bits for p in precisions], dtype=torch.int64)
    out = torch.empty(t * h, len(precisions))
    args = QerrArgs(
        ctypes.addressof(codebooks()),
        x.data_ptr(),
        DTYPE_CODES[x.dtype],
        t * h,
        d,
        group_size,
        k,
        m,
        codes.data_ptr(),
        bits.data_ptr(),
        codes.numel(),
        MAX_QUANTIZED_ABS,
        MAX_ROTATED_ABS,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    module.relative_errors(args)
    return out.view(t, h, -1).mean(1)


@functools.cache
def _clamp_bits(clamp: float, storage_dtype: torch.dtype) -> tuple[int, int]:
    """The storage dtype's bits of +clamp and -clamp, which must be exact in it (torch.clamp's results)."""
    bounds = torch.tensor([clamp, -clamp], dtype=storage_dtype)
    if bounds.float().tolist() != [clamp, -clamp]:
        raise ValueError(f"clamp must be exactly representable in {storage_dtype}, got {clamp}")
    return tuple(bounds.view(torch.int16).tolist())


def encode_pages(
    key: torch.Tensor,  # [num_slots, num_tokens, num_kv_heads, head_size] storage_dtype
    value: torch.Tensor,  # [num_slots, num_tokens, num_kv_heads, head_size] storage_dtype
    key_bits: torch.Tensor,  # [n, num_tokens] integer bit-widths
    value_bits: torch.Tensor,  # [n, num_tokens] integer bit-widths
    layout: fmt.PageLayout,
    storage_dtype: torch.dtype,
    module: Kernel | None = None,
    *,
    slots: torch.Tensor | None = None,  # [n] integer: the slot of key/value page i encodes
    clamp: float | None = None,  # clamp key/value to +-clamp first
    out: torch.Tensor | None = None,  # [num_rows, >= page_bytes] uint8, rows may be strided
    block_ids: torch.Tensor | None = None,  # [n] integer: the row of `out` page i is written to
) -> torch.Tensor:
    """PageCodec.encode's contract, compiled (oracle: PageCodec.encode): with the defaults,
    encode_pages(key, value, key_bits, value_bits, ...) -> pages [n, page_bytes] uint8, the codec's
    bytes (num_slots = n; num_tokens <= block_size, bit map bytes past it zero).

    In place, for KVStore.seal: page i encodes key[slots[i]], value[slots[i]] (default slot i),
    clamped to +-clamp first when given (as torch.clamp: inf -> +-clamp, NaN stays), and is written
    into row block_ids[i] of `out` (distinct rows; default a new tensor), which is returned.
    Raises ValueError as the codec does: bits outside 2/3/4/8/16 and bits that exceed the page budget
    before anything is written; a NaN/inf, or in a quantized record a rotated value beyond
    +-MAX_ROTATED_ABS, while encoding (`out` rows then hold partial pages). `module`: the built Kernel
    (default: build it). The rotation is done in C++ by rotation.fwht's butterflies, so every row
    rounds alike however the rows are batched."""
    if storage_dtype not in fmt.STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {fmt.STORAGE_DTYPES}, got {storage_dtype}")
    h, d = layout.num_kv_heads, layout.record.head_size
    if key_bits.dim() != 2 or value_bits.shape != key_bits.shape or key_bits.is_floating_point():
        raise ValueError(f"key_bits/value_bits must be [n, num_tokens] integers, got {list(key_bits.shape)}")
    n, t = key_bits.shape
    if not 1 <= t <= layout.block_size:
        raise ValueError(f"num_tokens must be within [1, {layout.block_size}], got {t}")
    if key.dim() != 4 or key.shape[1:] != (t, h, d) or value.shape != key.shape:
        raise ValueError(
            f"key/value must be [num_slots, {t}, {h}, {d}], got {list(key.shape)}/{list(value.shape)}"
        )
    if key.dtype != storage_dtype or value.dtype != storage_dtype:
        raise ValueError(f"key/value must be storage_dtype {storage_dtype}, got {key.dtype}/{value.dtype}")
    if not all(x.device.type == "cpu" for x in (key, value, key_bits, value_bits)):
        raise ValueError("encode_pages runs on the CPU: key, value and bits must be CPU tensors")
    if slots is None and key.shape[0] != n:
        raise ValueError(f"without slots, key/value hold one slot per page ({n}), got {key.shape[0]}")
    if slots is not None and (slots.shape != (n,) or slots.is_floating_point()):
        raise ValueError(f"slots must be [{n}] integers, got {list(slots.shape)}")
    if out is None:
        if block_ids is not None:
            raise ValueError("block_ids name rows of `out`; pass both or neither")
        out = torch.empty(n, layout.page_bytes, dtype=torch.uint8)
    elif out.dtype != torch.uint8 or out.dim() != 2 or out.shape[1] < layout.page_bytes or out.stride(1) != 1:
        raise ValueError(f"out must be [num_rows, >= {layout.page_bytes}] uint8 with contiguous rows")
    elif out.device.type != "cpu":
        raise ValueError("out must be a CPU tensor")
    elif block_ids is None or block_ids.shape != (n,) or block_ids.is_floating_point():
        raise ValueError(f"block_ids must be [{n}] integer rows of out")
    clamp_bits = (0, 0) if clamp is None else _clamp_bits(float(clamp), storage_dtype)
    if n == 0:
        return out
    key, value = key.contiguous(), value.contiguous()
    key_bits, value_bits = key_bits.to(torch.int64).contiguous(), value_bits.to(torch.int64).contiguous()
    slots = None if slots is None else slots.to(torch.int64).contiguous()
    rows = None if block_ids is None else block_ids.to(torch.int64).contiguous()
    args = SealArgs(
        _layout_array(layout, storage_dtype),
        ctypes.addressof(codebooks()),
        d,
        h,
        n,
        t,
        key.data_ptr(),
        value.data_ptr(),
        key.shape[0],
        None if slots is None else slots.data_ptr(),
        key_bits.data_ptr(),
        value_bits.data_ptr(),
        out.data_ptr(),
        out.stride(0),
        out.shape[0],
        None if rows is None else rows.data_ptr(),
        clamp is not None,
        0.0 if clamp is None else float(clamp),
        (ctypes.c_int64 * 2)(*clamp_bits),
        MAX_QUANTIZED_ABS,
        MAX_ROTATED_ABS,
        torch.get_num_threads(),
    )
    (module if module is not None else build()).seal(args)
    return out


def decode_pages(
    pages: torch.Tensor,  # [num_blocks, >= page_bytes] uint8 (one layer), rows may be strided
    block_ids: torch.Tensor,  # [n] integer: the rows of `pages` to decode
    layout: fmt.PageLayout,
    storage_dtype: torch.dtype,
    module: Kernel | None = None,
    *,
    out_key: torch.Tensor | None = None,  # [num_rows, block_size, num_kv_heads, head_size] storage_dtype
    out_value: torch.Tensor | None = None,  # the same
    out_rows: torch.Tensor | None = None,  # [n] integer: distinct rows of out_key/out_value (default 0..n-1)
    force_scalar: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PageCodec.decode's keys and values, compiled (oracle: PageCodec.decode(pages[block_ids]),
    converted .to(storage_dtype): the same bits): -> (key, value), each [n, block_size, num_kv_heads,
    head_size] storage_dtype, the whole block of each page.

    In place, for KVStore.gather: page block_ids[i] is written into row out_rows[i] of out_key and
    out_value (both contiguous; default new tensors, and row i); other rows are left as they were.
    Raises ValueError on bad arguments and RuntimeError on a page whose bit map is corrupt, both
    before anything is written. `module`: the built Kernel (default: build it). force_scalar: the
    portable path even where the AVX-512 one is compiled in (tests)."""
    if storage_dtype not in fmt.STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {fmt.STORAGE_DTYPES}, got {storage_dtype}")
    if pages.dtype != torch.uint8 or pages.dim() != 2 or pages.shape[1] < layout.page_bytes:
        raise ValueError(f"pages must be [num_blocks, >= {layout.page_bytes}] uint8, got {list(pages.shape)}")
    if pages.stride(1) != 1 or pages.device.type != "cpu":
        raise ValueError("pages must be a CPU tensor with contiguous rows")
    if block_ids.dim() != 1 or block_ids.is_floating_point() or block_ids.device.type != "cpu":
        raise ValueError(f"block_ids must be [n] CPU integers, got {list(block_ids.shape)} {block_ids.dtype}")
    n = block_ids.numel()
    if n and not (0 <= int(block_ids.min()) and int(block_ids.max()) < pages.shape[0]):
        raise ValueError(f"block_ids must be rows of pages (0..{pages.shape[0] - 1})")
    kv_shape = (layout.block_size, layout.num_kv_heads, layout.record.head_size)
    if (out_key is None) != (out_value is None):
        raise ValueError("pass out_key and out_value together, or neither")
    if out_key is None:
        if out_rows is not None:
            raise ValueError("out_rows name rows of out_key/out_value; pass them too")
        out_key = torch.empty(n, *kv_shape, dtype=storage_dtype)
        out_value = torch.empty_like(out_key)
    for name, out in (("out_key", out_key), ("out_value", out_value)):
        if out.dim() != 4 or tuple(out.shape[1:]) != kv_shape or out.dtype != storage_dtype:
            raise ValueError(
                f"{name} must be [num_rows, *{kv_shape}] {storage_dtype}, got {list(out.shape)} {out.dtype}"
            )
        if not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"{name} must be a contiguous CPU tensor")
    if out_value.shape != out_key.shape:
        raise ValueError(
            f"out_key and out_value must have one shape, got {list(out_key.shape)}/{list(out_value.shape)}"
        )
    if out_rows is None and out_key.shape[0] != n:
        raise ValueError(
            f"without out_rows, out_key/out_value hold one row per page ({n}), got {out_key.shape[0]}"
        )
    if out_rows is not None and (out_rows.shape != (n,) or out_rows.is_floating_point()):
        raise ValueError(f"out_rows must be [{n}] integers, got {list(out_rows.shape)}")
    if n == 0:
        return out_key, out_value
    block_ids = block_ids.to(torch.int64).contiguous()
    rows = None if out_rows is None else out_rows.to(torch.int64).contiguous()
    args = UnpackArgs(
        _layout_array(layout, storage_dtype),
        ctypes.addressof(codebooks()),
        layout.record.head_size,
        layout.num_kv_heads,
        n,
        pages.data_ptr(),
        pages.stride(0),
        pages.shape[0],
        block_ids.data_ptr(),
        None if rows is None else rows.data_ptr(),
        out_key.data_ptr(),
        out_value.data_ptr(),
        out_key.shape[0],
        int(force_scalar),
        torch.get_num_threads(),
    )
    (module if module is not None else build()).unpack(args)
    return out_key, out_value


def block_attention(
    query: torch.Tensor,
    staging_key: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    offsets: torch.Tensor,
    scale: float,
    received: torch.Tensor,
    module: Kernel,
) -> None:
    """kernels/block_attention.attend (the oracle), fused, added into `received` in place.

    query [T, num_heads, head_size] (each head's row contiguous); staging_key [num_slots, block_size,
    num_kv_heads, head_size] contiguous, the same 16-bit dtype (or fp32); rows, slots, offsets [n]
    int64: the query rows to use, the staging slot of each one's block and its position there;
    received [num_slots, block_size] fp32 contiguous: received[slot, j] += the attention (summed
    over query heads) that each query pays to position j <= its own of its block."""
    if query.dim() != 3 or staging_key.dim() != 4 or query.shape[2] != staging_key.shape[3]:
        raise ValueError(f"query {list(query.shape)} and staging_key {list(staging_key.shape)} do not match")
    if query.dtype != staging_key.dtype or query.dtype not in DTYPE_CODES:
        raise ValueError(f"query ({query.dtype}) and staging_key ({staging_key.dtype}) need one dtype")
    if query.stride(2) != 1 or not staging_key.is_contiguous():
        raise ValueError("each query head's row and staging_key must be contiguous")
    num_slots, block_size = staging_key.shape[:2]
    if (
        received.shape != (num_slots, block_size)
        or received.dtype != torch.float32
        or not received.is_contiguous()
    ):
        raise ValueError(
            f"received must be [{num_slots}, {block_size}] fp32 contiguous, got {list(received.shape)}"
        )
    index = [t.to(torch.int64).contiguous() for t in (rows, slots, offsets)]
    if not index[0].numel() == index[1].numel() == index[2].numel():
        raise ValueError("rows, slots and offsets must have one length")
    args = BlockAttnArgs(
        query.data_ptr(),
        query.shape[0],
        query.stride(0),
        query.stride(1),
        staging_key.data_ptr(),
        DTYPE_CODES[query.dtype],
        num_slots,
        block_size,
        query.shape[1],
        staging_key.shape[2],
        query.shape[2],
        *(t.data_ptr() for t in index),
        index[0].numel(),
        scale,
        received.data_ptr(),
        torch.get_num_threads(),
    )
    module.block_attention(args)


def rows_of(x: torch.Tensor) -> bool:
    """Is x [T, num_kv_heads, head_size] with each token's heads one contiguous row (StageRows)?"""
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]


class StageRows:
    """StagingArea.write_planned's torch form, compiled (its oracle; the same bytes): in every layer,
    dst_key[layer][dst_rows[i]] = key[src_rows[i]] and the same for values (src_rows None: i), K and
    V in one call, several threads for large steps.

    Prepared once per step (a step's layers write the same rows), called once per layer, where only
    that layer's K and V are checked: a decode step's call copies a few rows, and Python checks
    would cost more than the copy. dst_key, dst_value: staging, [num_layers, ..., num_kv_heads,
    head_size] contiguous, one dtype; dst_rows (distinct) and src_rows: [n] integer rows of a
    layer's [-1, num_kv_heads, head_size] view and of the step's tokens. ValueError on arguments
    that do not fit; the kernel checks every row's range before it writes anything."""

    def __init__(self, dst_key, dst_value, dst_rows, src_rows, module: Kernel):
        if not (dst_key.is_contiguous() and dst_value.is_contiguous() and dst_value.shape == dst_key.shape):
            raise ValueError(
                f"staging must be contiguous, got {list(dst_key.shape)} / {list(dst_value.shape)}"
            )
        if dst_key.dtype != dst_value.dtype or dst_key.dim() < 3:
            raise ValueError(f"staging K and V need one dtype and [L, ..., H, D], got {dst_key.dtype}")
        self.dst_key, self.dst_value, self.module = dst_key, dst_value, module
        self.dtype, self.row = dst_key.dtype, dst_key.shape[-2:]
        self.layer_bytes = dst_key[0].numel() * dst_key.element_size()
        self.row_bytes = self.row.numel() * dst_key.element_size()
        self.dst_rows = dst_rows.to(torch.int64).contiguous()
        self.src_rows = None if src_rows is None else src_rows.to(torch.int64).contiguous()
        self.n = self.dst_rows.numel()
        if self.src_rows is not None and self.src_rows.numel() != self.n:
            raise ValueError(f"{self.n} destination rows but {self.src_rows.numel()} source rows")
        self.num_dst_rows = dst_key[0].numel() // self.row.numel()
        self.threads = torch.get_num_threads()

    def __call__(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> bool:
        """key, value: [T, num_kv_heads, head_size] of the step's tokens. Copies and returns True, or
        returns False, writing nothing, when they are not token rows (`rows_of`) of staging's dtype
        and row shape (the caller then takes the torch form)."""
        if not (
            key.dtype == self.dtype
            and value.dtype == self.dtype
            and rows_of(key)
            and rows_of(value)
            and key.shape[1:] == self.row
            and value.shape == key.shape
            and min(key.stride(0), value.stride(0)) >= self.row.numel()  # rows apart, not overlapping
        ):
            return False
        if not 0 <= layer < self.dst_key.shape[0]:
            raise ValueError(f"layer {layer} is not one of staging's {self.dst_key.shape[0]}")
        if self.src_rows is None and self.n > key.shape[0]:
            raise ValueError(f"{self.n} destination rows for {key.shape[0]} tokens")
        if self.n == 0:
            return True
        size = key.element_size()
        self.module.stage_rows(
            self.dst_key.data_ptr() + layer * self.layer_bytes,
            self.dst_value.data_ptr() + layer * self.layer_bytes,
            self.num_dst_rows,
            self.dst_rows.data_ptr(),
            key.data_ptr(),
            key.stride(0) * size,
            value.data_ptr(),
            value.stride(0) * size,
            key.shape[0],
            None if self.src_rows is None else self.src_rows.data_ptr(),
            self.n,
            self.row_bytes,
            self.threads,
        )
        return True


def plan_pages(
    weight: torch.Tensor,
    distortion: torch.Tensor,
    cost: torch.Tensor,
    budget: int,
    floor_codes: torch.Tensor | None,
    module: Kernel,
) -> torch.Tensor | None:
    """blocks/planner.allocate for n pages in one call, compiled (its oracle; the same result):
    weight [n, T], distortion [n, T, P], cost [P] bytes per token at each precision code
    (increasing), budget bytes per page, floor_codes [n, T] precision codes granted first (None:
    none). -> [n, T] int64 precision codes, or None when a weight or distortion is NaN or inf (the
    oracle then decides, in Python's order). ValueError, as allocate raises it, when a page's tokens
    at the lowest precision exceed the budget."""
    if weight.dim() != 2 or distortion.shape[:2] != weight.shape or distortion.dim() != 3:
        raise ValueError(
            f"weight [n, T] and distortion [n, T, P], got {list(weight.shape)} / {list(distortion.shape)}"
        )
    n, num_tokens = weight.shape
    if cost.shape != (distortion.shape[2],):
        raise ValueError(f"cost must be [{distortion.shape[2]}], got {list(cost.shape)}")
    if floor_codes is not None and floor_codes.shape != weight.shape:
        raise ValueError(f"floor_codes must be {list(weight.shape)}, got {list(floor_codes.shape)}")
    codes = torch.empty(n, num_tokens, dtype=torch.int64)
    if n == 0:
        return codes
    w = weight.to(torch.float64).contiguous()  # fp32 -> fp64 exactly, as the oracle's tolist()
    d = distortion.to(torch.float64).contiguous()
    c = cost.to(torch.int64).contiguous()
    f = None if floor_codes is None else floor_codes.to(torch.int64).contiguous()
    planned = module.plan_pages(
        w.data_ptr(), d.data_ptr(), c.data_ptr(), c.numel(), int(budget),
        None if f is None else f.data_ptr(), n, num_tokens, codes.data_ptr(),
    )  # fmt: skip
    return codes if planned else None
