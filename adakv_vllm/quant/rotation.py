"""A fixed Hadamard rotation of every quantized K and V record, computed as exact butterflies.

Rotating a head's vector by a Hadamard matrix spreads its outlier channels over all channels, so the
rotated vector is close to Gaussian and a per-group scale with a Gaussian codebook (levels.py) fits
it (QuaRot, SpinQuant, TurboQuant). Keys are dotted with a query rotated the same way; values are
accumulated in the rotated space and rotated back once per query.

    rotate(x)   = FWHT(x) * 2**-k          k = floor(log2(block) / 2)
    unrotate(y) = FWHT(y) * 2**(k - m)     block = 2**m
    unrotate(rotate(x)) == x (up to fp32 rounding of the sums)

FWHT is the unnormalised Walsh-Hadamard transform of Sylvester's matrix H (H H = block * I), applied
to each block of `block` consecutive channels, where `block` is the largest power of two dividing
head_size (every supported head size is a multiple of 16, so blocks are at least 16 wide: 80 = 5 x
16). Its butterflies -- stage h = 1, 2, 4, ...: (x[i], x[i+h]) -> (x[i] + x[i+h], x[i] - x[i+h]) for i
in the first half of every 2h-run -- fix every fp32 operation, and the scalings are powers of two, so
a kernel that performs the same butterflies gets the same bits (no GEMM whose rounding depends on the
number of rows). With k = floor(m / 2) the rotation is orthonormal for block 16, 64, 256 and scales
norms by sqrt(2) for 32 and 128.
"""

from __future__ import annotations

import torch

from adakv_vllm.quant.format import check_head_size


def hadamard_block(head_size: int) -> int:
    check_head_size(head_size)
    return head_size & -head_size  # largest power of two dividing head_size


def scale_exponents(head_size: int) -> tuple[int, int]:
    """-> (k, m): rotate scales the butterflies by 2**-k, unrotate by 2**(k - m)."""
    m = hadamard_block(head_size).bit_length() - 1
    return m // 2, m


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised blockwise Walsh-Hadamard transform along the last dim, in the butterfly order of
    the module docstring. x: [..., head_size] fp32 -> fp32, same shape."""
    d = x.shape[-1]
    block = hadamard_block(d)
    y = x.to(torch.float32).reshape(-1, d // block, block)
    h = 1
    while h < block:
        pairs = y.reshape(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(y.shape)
        h *= 2
    return y.reshape(x.shape)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x: [..., head_size] -> fp32 [..., head_size], x H 2**-k."""
    k, _ = scale_exponents(x.shape[-1])
    return fwht(x) * 2.0**-k


def unrotate(y: torch.Tensor) -> torch.Tensor:
    """The inverse of rotate: y H 2**(k - m)."""
    k, m = scale_exponents(y.shape[-1])
    return fwht(y) * 2.0 ** (k - m)


def rotation_matrix(head_size: int) -> torch.Tensor:
    """[head_size, head_size] fp32: rotate(x) == x @ rotation_matrix(head_size) (for tests)."""
    return rotate(torch.eye(head_size))
