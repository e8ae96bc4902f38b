"""THE byte layout of mixed-precision KV records and pages. No other module knows a byte offset.

A *record* holds one vector of `head_size` elements (the key or the value of one token in one KV
head) at one precision:

    quantized (2/3/4/8 bits)                    FP16 (16 bits)
    +----------------------------+----------+   +-------------------------+
    | codes                      | scales   |   | head_size x 2 bytes,    |
    | head_size*bits/8 B         | fp16 x G |   | the model's 16-bit dtype|
    +----------------------------+----------+   +-------------------------+
    G = head_size / group_size groups. A quantized record holds the *rotated* vector (rotation.py):
    element i decodes as levels.LEVELS[bits][code_i] * scale of its group, and the vector is then
    rotated back. 16-bit records hold the original bytes (lossless).

Codes form a little-endian bit stream: element i occupies bits [i*bits, (i+1)*bits) of the stream,
bit k of the stream being bit k % 8 of byte k // 8. (At 2, 4 and 8 bits no code straddles a byte;
at 3 bits, 8 codes fill 3 bytes.)

A *page* is the bytes of one vLLM block in one layer (all KV heads). It is written once, when the
block seals, and never rewritten:

    0             header_bytes                                              page_bytes
    +-------------+--------------------+--------------------+-----+--------+
    | bit map     | head 0 region      | head 1 region      | ... | slack  |
    +-------------+--------------------+--------------------+-----+--------+
    bit map: one byte per token position; low nibble = key precision code, high nibble = value
             precision code (Precision.code). Padded to a multiple of HEADER_ALIGN.
    head region: the key records of the block's tokens, then their value records. Inside each,
             records are ordered by precision code ascending, ties by token position, so a record's
             offset follows from the bit map alone. Every head region has the same size.

The page budget is fixed by the user's key and value targets (`page_bytes_for_target`); the seal
planner must choose bits whose records fit (`fits`).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from adakv_vllm.quant.precision import PRECISIONS, Precision

# A group's scale is stored as fp16: 2 bytes.
PARAM_BYTES = 2
# The bit map is padded so the first record starts on a 16-byte boundary (vector loads).
HEADER_ALIGN = 16
# Pages are rounded up to this many bytes so page starts stay aligned inside vLLM's tensor.
PAGE_ALIGN = 16

SUPPORTED_GROUP_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 64
MIN_HEAD_SIZE, MAX_HEAD_SIZE, HEAD_SIZE_MULTIPLE = 32, 256, 16
# The 16-bit dtypes whose bytes an FP16 record stores verbatim.
STORAGE_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def check_head_size(head_size: int) -> None:
    if not (MIN_HEAD_SIZE <= head_size <= MAX_HEAD_SIZE and head_size % HEAD_SIZE_MULTIPLE == 0):
        raise ValueError(
            f"unsupported head_size {head_size}: AdaKV supports multiples of {HEAD_SIZE_MULTIPLE} "
            f"from {MIN_HEAD_SIZE} to {MAX_HEAD_SIZE}"
        )


def check_group_size(head_size: int, group_size: int) -> None:
    if group_size not in SUPPORTED_GROUP_SIZES or head_size % group_size != 0:
        allowed = [g for g in SUPPORTED_GROUP_SIZES if head_size % g == 0]
        raise ValueError(
            f"group_size {group_size} is not supported for head_size {head_size}; allowed: {allowed}"
        )


def code_mask(p: Precision) -> int:
    return (1 << p.bits) - 1


@dataclasses.dataclass(frozen=True)
class RecordLayout:
    """Sizes of the record of one `head_size` vector at each precision."""

    head_size: int
    group_size: int

    def __post_init__(self) -> None:
        check_head_size(self.head_size)
        check_group_size(self.head_size, self.group_size)

    @property
    def num_groups(self) -> int:
        return self.head_size // self.group_size

    def codes_bytes(self, p: Precision) -> int:
        return self.head_size * p.bits // 8

    def params_bytes(self, p: Precision) -> int:
        """Bytes of the per-group scales (zero for FP16)."""
        return self.num_groups * PARAM_BYTES if p.is_quantized else 0

    def record_bytes(self, p: Precision) -> int:
        return self.codes_bytes(p) + self.params_bytes(p)

    def scales_offset(self, p: Precision) -> int:
        assert p.is_quantized
        return self.codes_bytes(p)

    def bits_per_element(self, p: Precision) -> float:
        """What a record costs per element, scales included."""
        return 8 * self.record_bytes(p) / self.head_size

    def interpolated_bytes(self, bits: float) -> float:
        """Record bytes at a fractional average precision: linear between neighbouring precisions.

        This is the per-token byte cost a page budget grants at `bits`; e.g. 3.5 bits buys the
        bytes of half a 3-bit and half a 4-bit record.
        """
        if not PRECISIONS[0].bits <= bits <= PRECISIONS[-1].bits:
            raise ValueError(f"target bits must be within [2, 16], got {bits}")
        for lo, hi in zip(PRECISIONS, PRECISIONS[1:], strict=False):
            if lo.bits <= bits <= hi.bits:
                w = (bits - lo.bits) / (hi.bits - lo.bits)
                return (1 - w) * self.record_bytes(lo) + w * self.record_bytes(hi)
        raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class PageLayout:
    """Byte layout of one page: one block of `block_size` tokens, one layer, all KV heads."""

    block_size: int
    num_kv_heads: int
    record: RecordLayout
    page_bytes: int

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.num_kv_heads < 1:
            raise ValueError("block_size and num_kv_heads must be positive")
        if self.page_bytes < self.min_page_bytes:
            raise ValueError(
                f"page_bytes {self.page_bytes} cannot hold a page of all-2-bit records "
                f"(needs {self.min_page_bytes})"
            )

    @property
    def header_bytes(self) -> int:
        return _align(self.block_size, HEADER_ALIGN)

    @property
    def min_page_bytes(self) -> int:
        lowest = PRECISIONS[0]
        return self.header_bytes + self.num_kv_heads * self.block_size * 2 * self.record.record_bytes(lowest)

    def region_bytes(self, key_bits: torch.Tensor, value_bits: torch.Tensor) -> int:
        """Bytes of one head's region for the given per-token precisions.

        key_bits, value_bits: [num_tokens] integer bit-widths (num_tokens <= block_size).
        """
        return sum(
            int(self.record.record_bytes(p)) * int((key_bits == p.bits).sum() + (value_bits == p.bits).sum())
            for p in PRECISIONS
        )

    def used_bytes(self, key_bits: torch.Tensor, value_bits: torch.Tensor) -> int:
        return self.header_bytes + self.num_kv_heads * self.region_bytes(key_bits, value_bits)

    def fits(self, key_bits: torch.Tensor, value_bits: torch.Tensor) -> bool:
        return self.used_bytes(key_bits, value_bits) <= self.page_bytes

    def record_order(self, bits: torch.Tensor) -> torch.Tensor:
        """Token positions in record order: by precision ascending, ties by position.

        bits: [num_tokens] integer bit-widths. Returns [num_tokens] int64 positions.
        """
        return torch.sort(bits.to(torch.int64), stable=True).indices

    def class_spans(self, bits: torch.Tensor, start: int) -> list[tuple[Precision, int, int, int]]:
        """Where each precision's records lie, for records laid in `record_order` from `start`.

        Returns (precision, first record index, record count, byte offset) per non-empty class.
        """
        spans, index, offset = [], 0, start
        for p in PRECISIONS:
            count = int((bits == p.bits).sum())
            if count:
                spans.append((p, index, count, offset))
                index += count
                offset += count * self.record.record_bytes(p)
        return spans

    def head_region_offset(self, head: int, region_bytes: int) -> int:
        return self.header_bytes + head * region_bytes

    def token_costs(self) -> torch.Tensor:
        """[len(PRECISIONS)] int64: bytes one token's keys (or values) cost at each precision, all heads."""
        return torch.tensor([self.num_kv_heads * self.record.record_bytes(p) for p in PRECISIONS])

    def part_budgets(self, key_bits: float, value_bits: float) -> tuple[int, int]:
        """Bytes the keys and the values of a full block may use: the shares of the page that
        `page_bytes_for_target(..., key_bits, value_bits)` granted, the rounding slack to values."""
        keys = math.floor(self.num_kv_heads * self.block_size * self.record.interpolated_bytes(key_bits))
        return keys, self.page_bytes - self.header_bytes - keys


def page_bytes_for_target(
    block_size: int, num_kv_heads: int, record: RecordLayout, key_bits: float, value_bits: float
) -> int:
    """The page size that grants every token, on average, `key_bits`/`value_bits` precision."""
    per_token = record.interpolated_bytes(key_bits) + record.interpolated_bytes(value_bits)
    header = _align(block_size, HEADER_ALIGN)
    return _align(header + math.ceil(num_kv_heads * block_size * per_token), PAGE_ALIGN)


def join_codes(key_codes: torch.Tensor, value_codes: torch.Tensor) -> torch.Tensor:
    """Precision codes -> bit-map bytes (key in the low nibble, value in the high one), uint8."""
    return (key_codes.to(torch.int64) | (value_codes.to(torch.int64) << 4)).to(torch.uint8)


def split_codes(bit_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit-map bytes (any shape) -> (key codes, value codes), int64, the same shape."""
    raw = bit_map.to(torch.int64)
    return raw & 0xF, raw >> 4


def encode_bit_map(key_bits: torch.Tensor, value_bits: torch.Tensor, header_bytes: int) -> torch.Tensor:
    """key_bits, value_bits: [num_tokens] bit-widths -> [header_bytes] uint8 bit map."""
    out = torch.zeros(header_bytes, dtype=torch.uint8)
    out[: key_bits.numel()] = join_codes(bits_to_codes(key_bits), bits_to_codes(value_bits))
    return out


def decode_bit_map(header: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """header: [..., >= num_tokens] uint8 -> (key_bits, value_bits), each [..., num_tokens] int64."""
    key_codes, value_codes = split_codes(header[..., :num_tokens])
    bits = torch.tensor([p.bits for p in PRECISIONS], dtype=torch.int64)
    return bits[key_codes], bits[value_codes]


def bits_to_codes(bits: torch.Tensor) -> torch.Tensor:
    """Bit-widths (any shape) -> precision codes, int64; ValueError on anything but ALL_BITS."""
    bits = bits.to(torch.int64)
    codes = torch.full_like(bits, -1)
    for p in PRECISIONS:
        codes[bits == p.bits] = p.code
    if (codes < 0).any():
        raise ValueError(f"bits must be in {[p.bits for p in PRECISIONS]}, got {bits.unique().tolist()}")
    return codes


def pack_codes(codes: torch.Tensor, p: Precision) -> torch.Tensor:
    """codes: [..., head_size] uint8 in [0, 2**bits) -> [..., head_size*bits/8] uint8 (the bit stream)."""
    shifts = torch.arange(p.bits, dtype=torch.int32)
    stream = (codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # [..., D, bits], LSB first
    stream = stream.reshape(*codes.shape[:-1], -1, 8)  # [..., D*bits/8, 8]
    return (stream << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, p: Precision) -> torch.Tensor:
    """packed: [..., head_size*bits/8] uint8 -> [..., head_size] uint8 codes."""
    stream = (packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1
    stream = stream.reshape(*packed.shape[:-1], -1, p.bits)  # [..., D, bits]
    return (stream << torch.arange(p.bits, dtype=torch.int32)).sum(-1).to(torch.uint8)


def split_record(records: torch.Tensor, layout: RecordLayout, p: Precision):
    """records: [n, record_bytes] uint8 -> (packed codes [n, codes_bytes] uint8, scales [n, G] fp16).
    Quantized precisions only."""
    a = layout.scales_offset(p)
    scales = records[:, a : a + layout.num_groups * PARAM_BYTES].contiguous().view(torch.float16)
    return records[:, :a], scales.reshape(-1, layout.num_groups)


def join_record(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of split_record: -> [n, record_bytes] uint8."""
    n = packed.shape[0]
    return torch.cat([packed, scales.contiguous().view(torch.uint8).reshape(n, -1)], dim=1)
