"""The compiled staging write (csrc/cpu_stage.cpp) against its oracle, StagingArea's torch form."""

from __future__ import annotations

import pytest
import torch

from adakv_vllm.blocks import staging as staging_mod
from adakv_vllm.kernels import cpu, library

H, D, BS = 3, 64, 32


@pytest.fixture(scope="module")
def module():
    return library.build()


def _step(num_tokens: int, seed: int, dtype=torch.bfloat16):
    """A step's K and V as vLLM hands them over: views into one qkv row per token (strided tokens)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, (9 + 2 * H) * D, generator=gen).to(dtype)
    key = qkv[:, 9 * D : (9 + H) * D].unflatten(1, (H, D))
    value = qkv[:, (9 + H) * D :].unflatten(1, (H, D))
    return key, value


def _area(dtype=torch.bfloat16) -> staging_mod.StagingArea:
    area = staging_mod.StagingArea(2, 64, BS, H, D, dtype, max_slots=40)
    area.key.fill_(7.0)  # so that untouched rows are checked too
    area.value.fill_(-7.0)
    return area


@pytest.mark.parametrize("num_tokens", [1, 8, 700])  # 700: more rows than one thread takes
@pytest.mark.parametrize("padding", [False, True])
def test_write_matches_the_torch_form(module, monkeypatch, num_tokens, padding):
    key, value = _step(num_tokens, seed=num_tokens)
    assert cpu.rows_of(key) and (num_tokens == 1 or not key.is_contiguous())
    gen = torch.Generator().manual_seed(1)
    mapping = torch.randperm(40 * BS, generator=gen)[:num_tokens]  # distinct slots, any order
    if padding:
        mapping[::3] = -1
    fast, slow = _area(), _area()
    fast.write(1, mapping, key, value)
    monkeypatch.setattr(library, "load", lambda: None)  # the torch form, the oracle
    slow.write(1, mapping, key, value)
    assert torch.equal(fast.key, slow.key) and torch.equal(fast.value, slow.value)
    assert torch.equal(fast.slot_of_block, slow.slot_of_block)


def test_other_dtypes_and_layouts_take_the_torch_form(module):
    key, value = _step(8, seed=3, dtype=torch.float32)  # staging is bf16: a cast is needed
    mapping = torch.arange(8) * 5
    area = _area()
    area.write(0, mapping, key, value)
    rows = area.key[0].flatten(0, 1)[mapping]
    assert torch.equal(rows, key.bfloat16())
    transposed = key.transpose(1, 2).contiguous().transpose(1, 2)  # heads not one row per token
    assert not cpu.rows_of(transposed)
    area.write(0, mapping, transposed.bfloat16(), value.bfloat16())
    assert torch.equal(area.key[0].flatten(0, 1)[mapping], key.bfloat16())


def test_bad_rows_raise_and_write_nothing(module):
    key, value = _step(4, seed=4)
    dst_key, dst_value = torch.zeros(2, 10, H, D).bfloat16(), torch.zeros(2, 10, H, D).bfloat16()
    with pytest.raises(ValueError, match="out of range"):
        cpu.StageRows(dst_key, dst_value, torch.tensor([0, 1, 2, 10]), None, module)(1, key, value)
    with pytest.raises(ValueError, match="out of range"):
        cpu.StageRows(dst_key, dst_value, torch.tensor([0, 1]), torch.tensor([0, 4]), module)(0, key, value)
    copy = cpu.StageRows(dst_key, dst_value, torch.tensor([0]), None, module)
    assert not copy(0, key.float(), value.float())  # not staging's dtype: the caller's torch form
    assert not copy(0, key.transpose(1, 2).contiguous().transpose(1, 2), value)  # not token rows
    with pytest.raises(ValueError, match="layer 2"):
        copy(2, key, value)  # no such layer
    with pytest.raises(ValueError, match="destination rows"):
        cpu.StageRows(dst_key, dst_value, torch.arange(5), None, module)(0, key, value)
    assert not dst_key.any() and not dst_value.any()
