"""The codebooks: what each code of a quantized record means, in units of its group's scale.

A rotated K or V vector is close to Gaussian (rotation.py), so 2, 3 and 4-bit codes use the Lloyd-Max
levels of a unit Gaussian (the levels that minimise the expected squared error; Max 1960), and 8-bit
codes a uniform grid. Every codebook is symmetric (level j == -level[n-1-j]), so a group needs one
fp16 scale and no min: half the metadata of an asymmetric (scale, min) pair.

    value(code) = LEVELS[bits][code] * scale          (fp32 multiply)

Encoding (reference.quantize) picks, per group, the scale among CLIP_FACTORS[bits] candidates
fp16(absmax * f / top level) with the least squared error -- f < 1 clips the largest values to buy
a finer grid for the rest (error-fitted clipping) -- then each element's nearest level: its code is the
number of THRESHOLDS below x / scale. The tables are fp32 numbers that kernels receive as they are,
so every implementation rounds alike.
"""

from __future__ import annotations

import torch

# Lloyd-Max quantizer of N(0, 1) (positive half; the codebook is symmetric).
_LLOYD_MAX_HALF = {
    2: (0.4528, 1.5104),
    3: (0.2451, 0.7560, 1.3439, 2.1520),
    4: (0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6181, 2.0690, 2.7326),
}
# 8 bits: a uniform grid over +-3.98 (a unit-variance group's absmax lands near the top level)
_UNIFORM_8 = tuple((c + 0.5) / 32 for c in range(128))

QUANTIZED_BITS: tuple[int, ...] = (2, 3, 4, 8)
# Names this quantizer in controller weights' metadata: features measured with another quantizer
# (another codebook, rotation or clip search) mean something else. Bump when any of them changes.
QUANTIZER_ID = "lloyd-fwht-clip13-v1"


def _symmetric(half) -> torch.Tensor:
    half = torch.tensor(half, dtype=torch.float32)
    return torch.cat([-half.flip(0), half])


LEVELS: dict[int, torch.Tensor] = {
    **{bits: _symmetric(half) for bits, half in _LLOYD_MAX_HALF.items()},
    8: _symmetric(_UNIFORM_8),
}
# x / scale > THRESHOLDS[bits][j] for exactly `code` values of j (midpoints between levels, fp32)
THRESHOLDS: dict[int, torch.Tensor] = {bits: (lv[1:] + lv[:-1]) / 2 for bits, lv in LEVELS.items()}
# candidate clip fractions, best first on ties; 8 bits never clips (its error is already ~1e-3)
CLIP_FACTORS: dict[int, torch.Tensor] = {
    **{bits: torch.tensor([1.0 - 0.05 * i for i in range(13)], dtype=torch.float32) for bits in (2, 3, 4)},
    8: torch.tensor([1.0], dtype=torch.float32),
}

assert all(LEVELS[b].numel() == 2**b for b in QUANTIZED_BITS)
assert all(THRESHOLDS[b][2 ** (b - 1) - 1] == 0 for b in QUANTIZED_BITS)  # symmetric: 0 is a threshold


def zero_code(bits: int) -> int:
    """The code a group with scale 0 stores: the threshold at 0 counts as 'not below'."""
    return 2 ** (bits - 1) - 1
