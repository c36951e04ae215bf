"""128-aligned expert segments: the row layout of the grouped FP8 GEMMs ([V3] §3.3).

The routed experts of an MoE layer each see a different, data-dependent slice of the
tokens, sorted by expert. :func:`pad_segments` copies those tokens into segments that
start at multiples of 128, filling the gaps with zero rows. Then every 128-row tile of
the token matrix belongs to exactly one expert, and:

- a GEMM row tile (``BLOCK_M`` divides 128) multiplies one expert's weight only; the
  kernel finds which from a segment -> expert map computed on the device;
- the 128x1 tiles of Wgrad never straddle two experts, so quantizing the whole padded
  matrix at once gives each expert exactly the tiles it would get on its own;
- zero rows change no tile's amax, hence no scale, and add nothing to any sum: the
  grouped results are those of the per-expert GEMMs (:mod:`dsv3lite.fp8.linear`).

**No host synchronisation.** The padded row count is the static bound
``N + E·127`` rounded up to a multiple of 128: it depends on shapes only, never on the
counts, so nothing is read back to the host and the whole layer can be captured in a
CUDA graph. The price is up to 127 zero rows per expert plus the unused tail (rows past
the last segment), which the GEMM kernel (:mod:`dsv3lite.fp8.grouped_kernels`) skips
without computing.

**K-major activation scales.** At each 128-wide K step a GEMM program needs the scales
of its ``BLOCK_M`` rows. Stored as a (ceil(K/128), M) contiguous tensor, handed to the
GEMM as its transposed (M, ceil(K/128)) view with strides (1, M), those scales are one
contiguous load: the column-major layout ``torch._scaled_mm`` expects for block-wise
scales. The Triton quantizers write them that way (:mod:`dsv3lite.fp8.kernels`); the reference
writes (M, ceil(K/128)) row-major, and :func:`k_major` re-lays such scales (a copy of
M·K/128 floats, none when they are K-major already). The kernels read any strides.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .reference import BLOCK_SIZE, ceil_div

__all__ = ["ALIGN", "padded_rows", "pad_segments", "unpad", "k_major", "check_counts",
           "check_ends"]

ALIGN = BLOCK_SIZE
"""Segment alignment: every expert's rows start at a multiple of 128 (one Wgrad tile)."""
_INTEGER_DTYPES = (torch.int32, torch.int64)


def padded_rows(n_rows: int, n_experts: int, align: int = ALIGN) -> int:
    """Static row count of :func:`pad_segments`' output: N + E·(align-1), rounded up.

    Args:
        n_rows: N, tokens in all segments together.
        n_experts: E.
        align: Segment alignment.

    Returns:
        The smallest multiple of ``align`` that is >= N + E·(align - 1), an upper bound
        of the padded segments' total whatever the counts are.
    """
    return ceil_div(n_rows + n_experts * (align - 1), align) * align


def check_counts(counts: Any, n_rows: Optional[int], device: torch.device) -> None:
    """Raise a ValueError naming ``counts`` unless it is a 1-D integer tensor of rows per
    expert on ``device``; on the CPU (no sync there) also unless it is >= 0 and sums to
    ``n_rows`` (``None``: not checked)."""
    if not isinstance(counts, torch.Tensor) or counts.dtype not in _INTEGER_DTYPES \
            or counts.dim() != 1 or counts.numel() < 1:
        what = (f"a {counts.dtype} tensor of shape {tuple(counts.shape)}"
                if isinstance(counts, torch.Tensor) else type(counts).__name__)
        raise ValueError(f"counts is {what}: must be a 1-D int32/int64 tensor with one "
                         "entry (tokens) per expert")
    if counts.device != device:
        raise ValueError(f"counts is on {counts.device}: must be on x's device {device}")
    if n_rows is not None and counts.device.type == "cpu" \
            and not torch.compiler.is_compiling():  # checkable without a sync or graph break
        if bool((counts < 0).any()) or int(counts.sum()) != n_rows:
            raise ValueError(f"counts={counts.tolist()} is invalid: must be >= 0 and sum "
                             f"to the number of rows of x, {n_rows}")


def check_ends(ends: Any, n_experts: Optional[int], device: torch.device) -> None:
    """Raise a ValueError naming ``ends`` unless it is a 1-D integer tensor of segment
    ends on ``device``, one per expert (``n_experts=None``: any number >= 1). Their
    values are checked only where they are read on the host (the references)."""
    if not isinstance(ends, torch.Tensor) or ends.dtype not in _INTEGER_DTYPES \
            or ends.dim() != 1 \
            or ends.numel() != (max(ends.numel(), 1) if n_experts is None else n_experts):
        what = (f"a {ends.dtype} tensor of shape {tuple(ends.shape)}"
                if isinstance(ends, torch.Tensor) else type(ends).__name__)
        size = "(E,) with E >= 1" if n_experts is None else f"({n_experts},)"
        raise ValueError(f"ends is {what}: must be a 1-D int32/int64 tensor of shape {size}"
                         ", one segment end per expert (pad_segments' padded_ends)")
    if ends.device != device:
        raise ValueError(f"ends is on {ends.device}: must be on the operands' device {device}")


def pad_segments(x: torch.Tensor, counts: torch.Tensor,
                 align: int = ALIGN) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place each expert's rows in a segment that starts at a multiple of ``align``.

    Nothing is read back to the host: the output's shape depends on (N, E, align) only
    (:func:`padded_rows`); rows that belong to no token are zero, and rows past the
    last segment are padding too.

    Args:
        x: (N, K) rows sorted by expert: counts[0] rows of expert 0, then expert 1's...

        counts: (E,) int32/int64 rows per expert, on x's device; must sum to N
            (checked only for CPU tensors, where it costs no synchronisation).

        align: Segment alignment; the grouped FP8 GEMMs need 128.

    Returns:
        ``(x_padded, padded_ends, index)``: x_padded (padded_rows(N, E, align), K) like
        x (differentiable); padded_ends (E,) int64, the end of every expert's segment
        (its start is the previous end, 0 for expert 0), multiples of ``align``;
        index (N,) int64, the padded row of each row of x: ``x_padded[index] == x``,
        and outputs computed on x_padded come back with :func:`unpad`.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x has shape {tuple(getattr(x, 'shape', ()))}: must be a 2-D "
                         "(N, K) tensor of rows sorted by expert")
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ValueError(f"align={align!r} is invalid: must be a positive integer")
    check_counts(counts, x.shape[0], x.device)
    n_rows, n_experts = x.shape[0], counts.numel()
    counts = counts.long()
    ends = counts.cumsum(0)
    padded_sizes = (counts + (align - 1)) // align * align
    padded_ends = padded_sizes.cumsum(0)
    shift = (padded_ends - padded_sizes) - (ends - counts)  # padded start - start
    rows = torch.arange(n_rows, device=x.device)
    expert_of_row = torch.searchsorted(ends, rows, right=True)  # no sync, unlike bincount
    index = rows + shift[expert_of_row]
    x_padded = x.new_zeros(padded_rows(n_rows, n_experts, align), x.shape[1])
    return x_padded.index_copy(0, index, x), padded_ends, index


def unpad(y_padded: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows of ``y_padded`` that hold real tokens, in their original order.

    Args:
        y_padded: (M, ...) output of a computation on :func:`pad_segments`' x_padded.
        index: (N,) the index returned by :func:`pad_segments`.

    Returns:
        (N, ...) ``y_padded[index]`` (differentiable).
    """
    return y_padded.index_select(0, index)


def k_major(s: torch.Tensor) -> torch.Tensor:
    """Re-lay (M, n) scales K-major: the same (M, n) values, stored as (n, M) contiguous.

    Args:
        s: (M, n) scales, one row per token (``act_quant``'s layout).

    Returns:
        An (M, n) view with strides (1, M), so the scales of consecutive rows at one K
        block are adjacent in memory.
    """
    return s.t().contiguous().t()
