"""Vectorised page encode/decode: many pages at once, the same bytes as `quant.reference`.

The oracle `reference.pack_page` / `unpack_page` walks one page, head by head. Here every record's
byte offset is computed for a batch of pages with one-hot cumulative sums over the bit maps, and each
precision class is then encoded or decoded with one gather/scatter. Layout facts come only from
`quant.format`; this module adds index arithmetic, never offsets of its own.

Quantized records hold Hadamard-rotated keys and values (rotation.py, inside reference.encode_records)
and are rotated back on decode; 16-bit records always hold the original bytes, so they stay lossless.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adakv_vllm.quant import format as fmt
from adakv_vllm.quant import reference as ref
from adakv_vllm.quant.precision import PRECISIONS


class PageCodec:
    """Encode/decode batches of full pages for one PageLayout and one 16-bit storage dtype."""

    def __init__(self, layout: fmt.PageLayout, storage_dtype: torch.dtype):
        self.layout = layout
        self.storage_dtype = storage_dtype
        # record bytes per precision code: [4] int64
        self.record_bytes = torch.tensor([layout.record.record_bytes(p) for p in PRECISIONS])

    def _part_offsets(self, codes: torch.Tensor):
        """codes: [n, T] precision codes -> (offset within its part [n, T], part bytes [n])."""
        onehot = F.one_hot(codes, len(PRECISIONS))  # [n, T, 4]
        class_bytes = onehot.sum(1) * self.record_bytes  # [n, 4]
        class_start = torch.cumsum(class_bytes, -1) - class_bytes  # exclusive prefix: [n, 4]
        rank = (torch.cumsum(onehot, 1) - 1).gather(2, codes.unsqueeze(-1)).squeeze(-1)  # [n, T]
        return class_start.gather(1, codes) + rank * self.record_bytes[codes], class_bytes.sum(-1)

    def offsets(self, key_codes: torch.Tensor, value_codes: torch.Tensor):
        """Byte offsets of head 0's records from the page start, and the per-head region size.

        key_codes, value_codes: [n, T] int64 -> key_off [n, T], value_off [n, T], region [n].
        Head h's record lies at off + h * region.
        """
        header = self.layout.header_bytes
        key_off, key_total = self._part_offsets(key_codes)
        value_off, value_total = self._part_offsets(value_codes)
        return header + key_off, header + key_total.unsqueeze(1) + value_off, key_total + value_total

    def _record_index(self, off, region, page_idx, tok_idx, size):
        """Flat byte indices [m, H, size] of the records of (page_idx, tok_idx) pairs."""
        heads = torch.arange(self.layout.num_kv_heads)
        start = page_idx * self.layout.page_bytes + off[page_idx, tok_idx]  # [m]
        start = start[:, None] + heads[None, :] * region[page_idx][:, None]  # [m, H]
        return start[..., None] + torch.arange(size)  # [m, H, size]

    def encode(self, key, value, key_bits, value_bits) -> torch.Tensor:
        """key, value: [n, T, H, D] 16-bit; key_bits, value_bits: [n, T] -> pages [n, page_bytes] uint8."""
        n, t, h, d = key.shape
        key_codes, value_codes = _codes(key_bits), _codes(value_bits)
        key_off, value_off, region = self.offsets(key_codes, value_codes)
        if (self.layout.header_bytes + h * region > self.layout.page_bytes).any():
            raise ValueError("bits exceed the page budget")
        pages = torch.zeros(n * self.layout.page_bytes, dtype=torch.uint8)
        header = torch.arange(t) + torch.arange(n)[:, None] * self.layout.page_bytes
        pages[header.reshape(-1)] = fmt.join_codes(key_codes, value_codes).reshape(-1)
        for x, codes, off in ((key, key_codes, key_off), (value, value_codes, value_off)):
            for p in PRECISIONS:
                page_idx, tok_idx = (codes == p.code).nonzero(as_tuple=True)
                if page_idx.numel() == 0:
                    continue
                size = self.layout.record.record_bytes(p)
                rows = x[page_idx, tok_idx].reshape(-1, d)  # [m*H, D]
                records = ref.encode_records(rows, p, self.layout.record)  # [m*H, size]
                pages[self._record_index(off, region, page_idx, tok_idx, size).reshape(-1)] = records.reshape(
                    -1
                )
        return pages.reshape(n, self.layout.page_bytes)

    def decode(self, pages: torch.Tensor, num_tokens: int | None = None):
        """pages: [n, page_bytes] uint8 -> (key, value [n, T, H, D] fp32, key_bits, value_bits [n, T])."""
        n = pages.shape[0]
        t = self.layout.block_size if num_tokens is None else num_tokens
        h, d = self.layout.num_kv_heads, self.layout.record.head_size
        key_codes, value_codes = fmt.split_codes(pages[:, :t])
        key_off, value_off, region = self.offsets(key_codes, value_codes)
        flat = pages.reshape(-1)
        out = []
        for codes, off in ((key_codes, key_off), (value_codes, value_off)):
            x = torch.empty(n, t, h, d)
            for p in PRECISIONS:
                page_idx, tok_idx = (codes == p.code).nonzero(as_tuple=True)
                if page_idx.numel() == 0:
                    continue
                size = self.layout.record.record_bytes(p)
                records = flat[self._record_index(off, region, page_idx, tok_idx, size)].reshape(-1, size)
                decoded = ref.decode_records(records, p, self.layout.record, self.storage_dtype)
                x[page_idx, tok_idx] = decoded.reshape(-1, h, d)
            out.append(x)
        bits = torch.tensor([p.bits for p in PRECISIONS])
        return out[0], out[1], bits[key_codes], bits[value_codes]


def _codes(bits: torch.Tensor) -> torch.Tensor:
    """[n, T] bit-widths -> [n, T] int64 precision codes (ValueError on anything else)."""
    return fmt.bits_to_codes(bits)
