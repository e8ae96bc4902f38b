"""The precisions a cached token can be stored at, and their one-nibble codes.

Invariant: a precision is one of 2, 3, 4, 8 or 16 bits. 16 means "the model's own 16-bit dtype, stored
verbatim" (bf16 or fp16), so a 16-bit record is lossless. Codes 0..4 are what the page bit map
stores; their order is the order of the precisions, so `code(a) < code(b)` iff `a < b`.
"""

from __future__ import annotations

import enum


class Precision(enum.IntEnum):
    """Bits per cached element. Values are the bit-widths themselves."""

    INT2 = 2
    INT3 = 3
    INT4 = 4
    INT8 = 8
    FP16 = 16

    @property
    def bits(self) -> int:
        return int(self)

    @property
    def code(self) -> int:
        """The nibble stored in a page's bit map for this precision."""
        return _CODES[self]

    @property
    def is_quantized(self) -> bool:
        return self is not Precision.FP16

    @property
    def levels(self) -> int:
        """Number of integer codes of a quantized precision (2**bits)."""
        if not self.is_quantized:
            raise ValueError("FP16 records are stored verbatim and have no integer levels")
        return 1 << self.bits

    @classmethod
    def parse(cls, bits: int) -> Precision:
        """Validate a user-supplied bit-width."""
        try:
            return cls(int(bits))
        except (ValueError, TypeError):
            raise ValueError(f"bits must be one of {ALL_BITS}, got {bits!r}") from None

    @classmethod
    def from_code(cls, code: int) -> Precision:
        return PRECISIONS[code]


PRECISIONS: tuple[Precision, ...] = (
    Precision.INT2,
    Precision.INT3,
    Precision.INT4,
    Precision.INT8,
    Precision.FP16,
)
ALL_BITS: tuple[int, ...] = tuple(p.bits for p in PRECISIONS)
_CODES = {p: i for i, p in enumerate(PRECISIONS)}


def mean_code_bits(histogram: list[int]) -> float:
    """Average code bits of the records counted per precision (in PRECISIONS order); NaN if none."""
    total = sum(histogram)
    if not total:
        return float("nan")
    return sum(p.bits * count for p, count in zip(PRECISIONS, histogram, strict=True)) / total
