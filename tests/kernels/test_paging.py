"""The vectorised PageCodec against the oracle: bit-exact pages, identical decodes."""

from __future__ import annotations

import pytest
import torch

from adakv_vllm.kernels.page_codec import PageCodec
from adakv_vllm.quant import format as fmt
from adakv_vllm.quant import reference as ref
from adakv_vllm.quant.precision import ALL_BITS

# (block_size, num_kv_heads, head_size, group_size, target bits)
CASES = [
    (32, 3, 64, 64, 3.5),  # SmolLM2
    (32, 3, 64, 32, 4),
    (16, 1, 64, 16, 3),  # one KV head (TP=3 rank)
    (17, 2, 80, 16, 8),  # odd block, non-power-of-two head
    (8, 4, 128, 64, 2.5),  # GQA-ish, big head
    (1, 2, 64, 32, 16),  # a single token
]


def _random_bits(layout, n, gen, uniform=None):
    """[n, T] key/value bits that fit the page: sample, then lower tokens until they fit."""
    t = layout.block_size
    choices = torch.tensor(ALL_BITS)
    kb = choices[torch.randint(0, len(ALL_BITS), (n, t), generator=gen)]
    vb = choices[torch.randint(0, len(ALL_BITS), (n, t), generator=gen)]
    if uniform is not None:
        kb[:], vb[:] = uniform, uniform
    for i in range(n):
        pos = 0
        while not layout.fits(kb[i], vb[i]):
            kb[i, pos % t] = 2 if pos // t % 2 == 0 else kb[i, pos % t]
            vb[i, pos % t] = 2
            pos += 1
    return kb, vb


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_codec_matches_oracle(case, dtype):
    block_size, heads, head_size, group, target = case
    record = fmt.RecordLayout(head_size, group)
    layout = fmt.PageLayout(
        block_size, heads, record, fmt.page_bytes_for_target(block_size, heads, record, target, target)
    )
    gen = torch.Generator().manual_seed(block_size * 7 + heads)
    n = 4
    key = torch.randn(n, block_size, heads, head_size, generator=gen).to(dtype)
    value = torch.randn(n, block_size, heads, head_size, generator=gen).to(dtype)
    kb, vb = _random_bits(layout, n, gen)
    codec = PageCodec(layout, dtype)
    pages = codec.encode(key, value, kb, vb)
    k2, v2, kb2, vb2 = codec.decode(pages)
    assert torch.equal(kb2, kb) and torch.equal(vb2, vb)
    for i in range(n):
        page = ref.pack_page(layout, key[i], value[i], kb[i], vb[i])
        assert torch.equal(pages[i], page)
        k1, v1, _, _ = ref.unpack_page(layout, page, block_size, dtype)
        assert torch.equal(k2[i], k1) and torch.equal(v2[i], v1)


def test_all_fp16_pages_are_lossless():
    record = fmt.RecordLayout(64, 32)
    layout = fmt.PageLayout(32, 3, record, fmt.page_bytes_for_target(32, 3, record, 16, 16))
    key = torch.randn(2, 32, 3, 64).bfloat16()
    value = torch.randn(2, 32, 3, 64).bfloat16()
    bits = torch.full((2, 32), 16)
    codec = PageCodec(layout, torch.bfloat16)
    k, v, _, _ = codec.decode(codec.encode(key, value, bits, bits))
    assert torch.equal(k.bfloat16(), key) and torch.equal(v.bfloat16(), value)


def test_all_2_bit_pages_decode_like_the_quantizer():
    record = fmt.RecordLayout(64, 32)
    layout = fmt.PageLayout(32, 3, record, fmt.page_bytes_for_target(32, 3, record, 2, 2))
    key = torch.randn(1, 32, 3, 64).bfloat16()
    bits = torch.full((1, 32), 2)
    k, _, _, _ = PageCodec(layout, torch.bfloat16).decode(
        PageCodec(layout, torch.bfloat16).encode(key, key, bits, bits)
    )
    expect = ref.stored_kv(key, ref.Precision.INT2, 32)
    assert torch.equal(k, expect)


def test_over_budget_rejected():
    record = fmt.RecordLayout(64, 32)
    layout = fmt.PageLayout(32, 3, record, fmt.page_bytes_for_target(32, 3, record, 4, 4))
    kv = torch.zeros(1, 32, 3, 64).bfloat16()
    with pytest.raises(ValueError, match="budget"):
        PageCodec(layout, torch.bfloat16).encode(kv, kv, torch.full((1, 32), 8), torch.full((1, 32), 8))
