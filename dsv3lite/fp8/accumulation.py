"""Hopper's limited FP8 accumulation, emulated in PyTorch ([V3] §3.3.2 "Increasing
Accumulation Precision", §3.5.2).

On the H800 the accumulation precision of FP8 GEMM is "limited to retaining around 14
bits" ([V3] §3.3.2). §3.5.2 describes the adder: it aligns the 32 mantissa products of
one instruction (``wgmma``, K = 32 for FP8 inputs) by right-shifting them to the largest
exponent, "only uses the highest 14 bits of each mantissa product" and **truncates** the
bits beyond; accumulating those sums into registers also uses 14-bit precision. Each
product of two E4M3 numbers is exact (4 x 4 significant bits), so all of the error comes
from the alignment and the narrow sum. Summed naively over a long K the accumulator
grows, every new product is truncated relative to it, and on GEMMs of two random
matrices (the report does not say how they were drawn) DeepSeek measured a maximum
relative error of nearly 2% at K = 4096 (§3.3.2).

The fix V3 uses: after every N_C = 128 elements (4 instructions) copy the partial sum to
FP32 registers on the CUDA cores, multiply in the two scales of that 128-wide K-block,
and add it to an FP32 accumulator. ``fp8_gemm`` does exactly this, one 128-wide
``tl.dot`` per K-block (:mod:`dsv3lite.fp8.kernels`).

This module models one output element as the hardware adds it::

    for each instruction (32 products p_1..p_32) with running sum a:
        E = exponent of max(|a|, |p_1|, ..., |p_32|)
        a = sum of each term truncated toward zero to a multiple of 2^(E - bits + 1)

with ``bits = 14``, and optionally a promotion of ``a`` into an exact (FP32) sum every
``promote_every`` elements. It is a model, simpler than the report's two stages (the 32
products aligned to the maximum exponent and truncated, then their sum accumulated into
registers with 14-bit precision, the report not saying how that step rounds; "around 14
bits" leaves the exact count open too): it aligns the running sum together with the 32
products and truncates all 33 terms in one step. With the report's statistic, the
largest element-wise relative error at K = 4096, the model errs more than the report's
nearly 2% on same-sign random operands (about 7%, ``tests/test_fp8_accumulation.py``);
on zero-mean operands that statistic is set by outputs that nearly cancel, not by the
accumulator. The tests and the chapter use the model to show the trend with K and the
effect of promotion, and to size the tolerance of promoted GEMMs, with a factor of four
of room.
"""

from __future__ import annotations

from typing import Optional

import torch

from .e4m3 import e4m3_to_float32
from .reference import BLOCK_SIZE, check_gemm_operands

__all__ = ["HOPPER_ACCUMULATOR_BITS", "WGMMA_K", "PROMOTION_INTERVAL", "truncate_aligned",
           "limited_precision_matmul", "emulate_fp8_gemm", "promoted_gemm_tolerance"]

HOPPER_ACCUMULATOR_BITS = 14
"""Significant bits the FP8 tensor cores keep when adding ([V3] §3.3.2: "around 14 bits";
§3.5.2: the highest 14 bits of each aligned product, the rest truncated)."""
WGMMA_K = 32
"""K of one Hopper FP8 ``wgmma`` instruction: 32 products are added per step."""
PROMOTION_INTERVAL = 128
"""N_C: elements accumulated on the tensor cores before promotion to FP32 ([V3] §3.3.2)."""


def truncate_aligned(terms: torch.Tensor, bits: int) -> torch.Tensor:
    """Align ``terms`` (..., n) to their largest exponent and keep ``bits`` bits.

    Args:
        terms: Float64 tensor; the last dim holds the numbers added in one step.
        bits: Significant bits kept, counted from the leading bit of the largest term.

    Returns:
        Tensor like ``terms``: each value truncated toward zero to a multiple of
        2^(E - bits + 1), where ``2^E <= max |term| < 2^(E+1)`` along the last dim.
    """
    largest = terms.abs().amax(dim=-1, keepdim=True)
    _, exponent = torch.frexp(largest)  # largest = m · 2^exponent, m in [0.5, 1): E = exponent-1
    quantum = torch.ldexp(torch.ones_like(largest), exponent - bits)
    return torch.trunc(terms / quantum) * quantum  # all-zero rows: 0 / 2^-bits = 0


def limited_precision_matmul(a: torch.Tensor, b: torch.Tensor,
                             accumulator_bits: Optional[int] = HOPPER_ACCUMULATOR_BITS,
                             promote_every: Optional[int] = None,
                             mma_k: int = WGMMA_K) -> torch.Tensor:
    """``a @ b.T`` summed the way a limited-precision tensor-core accumulator sums it.

    Args:
        a: (M, K) values (e.g. E4M3 values as floats); b: (N, K).

        accumulator_bits: Bits kept per accumulation step (14 on Hopper); ``None``
            means an exact accumulator.

        promote_every: Add the tensor-core partial sum into an exact accumulator and
            restart it every this many K-elements (a multiple of ``mma_k``; 128 in V3).
            ``None``: never, one accumulator runs over all of K.

        mma_k: Products added per instruction (32 for FP8 ``wgmma``).

    Returns:
        (M, N) float64 result. Products are formed exactly in float64.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a has shape {tuple(a.shape)} and b {tuple(b.shape)}: must be "
                         "(M, K) and (N, K)")
    if mma_k < 1:
        raise ValueError(f"mma_k={mma_k} is invalid: must be >= 1")
    if promote_every is not None and (promote_every < 1 or promote_every % mma_k):
        raise ValueError(f"promote_every={promote_every} is invalid: must be a positive "
                         f"multiple of mma_k={mma_k}, or None")
    if accumulator_bits is not None and accumulator_bits < 1:
        raise ValueError(f"accumulator_bits={accumulator_bits} is invalid: must be >= 1 or None")
    a64, b64 = a.double(), b.double()
    K = a.shape[1]
    promoted = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    partial = torch.zeros_like(promoted)  # the tensor-core accumulator
    for k in range(0, K, mma_k):
        products = a64[:, None, k:k + mma_k] * b64[None, :, k:k + mma_k]  # (M, N, <=mma_k)
        terms = torch.cat([partial[..., None], products], dim=-1)
        if accumulator_bits is not None:
            terms = truncate_aligned(terms, accumulator_bits)
        partial = terms.sum(dim=-1)
        if promote_every is not None and (k + mma_k) % promote_every == 0:
            promoted += partial  # copied to FP32 registers on the CUDA cores
            partial = torch.zeros_like(partial)
    return promoted + partial


def emulate_fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                     accumulator_bits: Optional[int] = HOPPER_ACCUMULATOR_BITS) -> torch.Tensor:
    """What ``fp8_gemm`` computes on Hopper: limited accumulation inside each 128-wide
    K-block, then the block's two scales and an FP32 sum across blocks.

    Args:
        a, a_s, b, b_s: The operands of :func:`~dsv3lite.fp8.fp8_gemm`, a 2-D.
        accumulator_bits: As in :func:`limited_precision_matmul`.

    Returns:
        (M, N) float32 result.
    """
    group_n = check_gemm_operands(a, a_s, b, b_s)
    if a.dim() != 2:
        raise ValueError(f"a has shape {tuple(a.shape)}: must be 2-D (M, K) here")
    N, K = b.shape
    b_s_rows = b_s.repeat_interleave(group_n, dim=0)[:N]  # (N, nk)
    a32, b32 = e4m3_to_float32(a), e4m3_to_float32(b)
    acc = torch.zeros(a.shape[0], N, dtype=torch.float32, device=a.device)
    for i in range(a_s.shape[1]):
        k = slice(i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE)
        partial = limited_precision_matmul(a32[:, k], b32[:, k], accumulator_bits)
        acc += partial.float() * a_s[:, i, None] * b_s_rows[None, :, i]  # promotion
    return acc


def promoted_gemm_tolerance(accumulator_bits: int = HOPPER_ACCUMULATOR_BITS,
                            same_sign: bool = False) -> float:
    """Relative error an FP32-output ``fp8_gemm`` may show on an FP8 tensor core.

    The error is measured as ||c - exact|| / ||exact|| (Frobenius), against the float64
    product of the dequantized operands. Both bounds are four or more times what the
    emulation (:func:`emulate_fp8_gemm`, 128x128 weight blocks, random normal data, K =
    512 to 4096) measures, which leaves room for hardware whose adder differs in detail
    from the model (how the 14-bit register sum rounds, the "around" of "around 14
    bits"):

    - **mixed-sign operands** (zero-mean, the tests' and benchmarks' random normal data):
      a GEMM promoted every 128 elements errs by about 2 · 2^-bits (measured 1.9-2.1 at
      14 bits, 3.1 at 12), whatever K is: each 128-block's error is relative to that
      block's partial sum, and the K/128 blocks add up independently, like the result.
      Bound 2^(3 - bits), 4.9e-4 for 14 bits, still below the error of a GEMM that never
      promotes once K reaches about 1024 (1.3e-3 at K = 4096);
    - **same-sign operands** (``same_sign=True``, e.g. all-positive data): truncation
      toward zero no longer cancels between terms but adds up, about 10 · 2^-bits
      (measured 10.2-10.4 at 14 bits, 6.2e-4 to 6.4e-4, above the mixed-sign bound;
      19.4-19.7 at 12 bits). Bound 2^(5 - bits), 1.95e-3 for 14 bits: three times the
      measurement at 14 bits, 1.6 times at 12.

    ``tests/test_fp8_accumulation.py`` checks both against the emulation.

    Args:
        accumulator_bits: Bits the tensor cores keep (14 on Hopper, [V3] §3.3.2).

        same_sign: Whether the operands may be all of one sign; the mixed-sign bound
            does not hold for them.

    Returns:
        2^(3 - accumulator_bits), or 2^(5 - accumulator_bits) with ``same_sign``.
    """
    if isinstance(accumulator_bits, bool) or not isinstance(accumulator_bits, int) \
            or accumulator_bits < 1:
        raise ValueError(f"accumulator_bits={accumulator_bits!r} is invalid: must be a "
                         "positive integer")
    if not isinstance(same_sign, bool):
        raise ValueError(f"same_sign={same_sign!r} is invalid: must be True or False")
    return 2.0 ** ((5 if same_sign else 3) - accumulator_bits)
