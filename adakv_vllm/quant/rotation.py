"""A fixed orthonormal Hadamard rotation per head, to spread key outliers across channels.

Because the rotation R is orthonormal, q . k == (q R) . (k R): rotating keys at write time and the
query at read time leaves attention scores unchanged up to rounding, while the rotated keys have
flatter per-group ranges and so quantize better (QuaRot, SpinQuant). For head sizes that are not a
power of two the rotation is block-diagonal with the largest power-of-two block dividing head_size
(e.g. 80 = 5 x 16); every supported head size is a multiple of 16, so blocks are at least 16 wide.
R is symmetric, so R is also its own inverse.
"""

from __future__ import annotations

import functools

import torch

from adakv_vllm.quant.format import check_head_size


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.cache
def rotation_matrix(head_size: int) -> torch.Tensor:
    """[head_size, head_size] fp32, orthonormal and symmetric."""
    check_head_size(head_size)
    block = head_size & -head_size  # largest power of two dividing head_size
    h = _sylvester(block) / block**0.5
    return torch.block_diag(*([h] * (head_size // block)))


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x: [..., head_size] -> fp32 [..., head_size], x @ R. Applying it twice is the identity."""
    return x.to(torch.float32) @ rotation_matrix(x.shape[-1])
