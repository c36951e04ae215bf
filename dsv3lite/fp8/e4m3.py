"""The E4M3 number format, as code ([V3] §3.3.2 "Mantissa over Exponents").

DeepSeek-V3 stores every FP8 tensor (activations, weights and gradients alike) in E4M3:
1 sign bit, 4 exponent bits (bias 7) and 3 mantissa bits, in the ``fn`` flavour that has
no infinities, so the largest finite value is 1.75 · 2^8 = **448**.
Three mantissa bits mean 8 representable values per power of two, so the gap between
neighbours (the *spacing*, one unit in the last place) is 2^(e-3) for a value in
[2^e, 2^(e+1)). Below the smallest normal 2^-6 the values are subnormal and evenly
spaced by 2^-9. Rounding to nearest therefore errs by at most half a spacing: a relative
error of at most 2^-4 = 6.25% for normal values.

Such a coarse format only works with fine-grained scaling: each small tile of a tensor
is divided by its own scale ``amax / 448`` so that its largest element lands on 448
(see :mod:`dsv3lite.fp8.reference`).
"""

from __future__ import annotations

import torch

__all__ = ["E4M3_DTYPE", "E4M3_MAX", "E4M3_MANTISSA_BITS", "E4M3_MIN_NORMAL",
           "E4M3_MIN_SUBNORMAL", "e4m3_spacing", "e4m3_values", "e4m3_to_float32",
           "rounding_edge_cases"]

E4M3_DTYPE = torch.float8_e4m3fn
"""The torch dtype of E4M3 (``fn``: finite only, NaN but no infinity)."""
E4M3_MAX = 448.0
"""Largest finite E4M3 value, 1.75 · 2^8."""
E4M3_MANTISSA_BITS = 3
"""Explicit mantissa bits: 2^3 = 8 values per binade."""
E4M3_MIN_NORMAL = 2.0 ** -6
"""Smallest normal E4M3 value (exponent bias 7, so 2^(1-7))."""
E4M3_MIN_SUBNORMAL = 2.0 ** -9
"""Smallest positive E4M3 value, and the spacing of all subnormals."""


def e4m3_spacing(x: torch.Tensor) -> torch.Tensor:
    """Gap between the E4M3 values that surround each element of ``x`` (``|x| <= 448``).

    Args:
        x: Any real tensor, in the *scaled* domain (what gets cast to E4M3).

    Returns:
        Tensor like ``x`` (fp32 or wider): ``2^(floor(log2|x|) - 3)`` for
        ``|x| >= 2^-6`` and 2^-9 for the subnormal range. Rounding to nearest errs by at
        most half of it.
    """
    magnitude = x.abs().float() if x.dtype.itemsize < 4 else x.abs()
    _, exponent = torch.frexp(magnitude)  # magnitude = m · 2^exponent, m in [0.5, 1)
    binade = torch.where(magnitude < E4M3_MIN_NORMAL,
                         torch.full_like(exponent, -6), exponent - 1)
    return torch.exp2((binade - E4M3_MANTISSA_BITS).to(magnitude.dtype))


def e4m3_values() -> torch.Tensor:
    """All finite non-negative E4M3 values in increasing order (fp32, 127 values)."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # 0x7F is NaN in the fn flavour
    return codes.view(E4M3_DTYPE).float()


_DECODE_TABLE = torch.arange(256, dtype=torch.uint8).view(E4M3_DTYPE).float()  # code -> value


def e4m3_to_float32(q: torch.Tensor) -> torch.Tensor:
    """Exact E4M3 -> fp32 conversion (every E4M3 value is an fp32 value).

    On CPU, torch's elementwise cast from float8 is scalar code; looking the 256 codes
    up in a table with ``index_select`` and int32 indices is about 4x faster (``take``
    needs int64 indices, twice the memory traffic), which matters for the CPU reference
    GEMM.

    Args:
        q: ``float8_e4m3fn`` tensor.

    Returns:
        fp32 tensor of the same shape and values.
    """
    if q.device.type != "cpu":
        return q.float()
    codes = q.view(torch.uint8).reshape(-1).int()
    return torch.index_select(_DECODE_TABLE, 0, codes).view(q.shape)


def rounding_edge_cases(scaled: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """Elements whose rounding to E4M3 is an edge case of round-to-nearest-even.

    Three classes: subnormal values; exact ties between two E4M3 values; and values
    that round *up* into the next power of 2 (the carry out of the mantissa). The Triton
    3.7 interpreter's fp32 -> fp8 cast gets exactly these wrong (it truncates
    subnormals, rounds ties away from zero and drops the carry), so CPU checks of the
    interpreted kernels compare every other element exactly.

    Args:
        scaled: fp32 values before the cast (x / s).
        rounded: Their correct E4M3 values (the reference quantizer's output).

    Returns:
        Boolean tensor like ``scaled``.
    """
    magnitude, target = scaled.abs().float(), rounded.float().abs()
    spacing = e4m3_spacing(magnitude)
    subnormal = magnitude < E4M3_MIN_NORMAL
    power_of_2 = target == torch.exp2(torch.floor(torch.log2(target.clamp(min=1e-30))))
    carry = power_of_2 & (magnitude < target)  # rounded up into the next binade
    tie = magnitude - torch.floor(magnitude / spacing) * spacing == spacing / 2
    return subnormal | carry | tie
