"""The grouped FP8 GEMMs in plain PyTorch, one expert at a time: the reference ([V3] §3.3).

The operands lie in 128-aligned segments (:mod:`dsv3lite.fp8.segments`), expert e's
rows (or, for Wgrad, tokens) in ``[ends[e-1], ends[e])``:

    grouped_fp8_gemm_ref   c[rows of e] = a[rows of e] · b[e]^T    Fprop and Dgrad
    grouped_wgrad_ref      dW[e] = dy_e^T · x_e, in fp32          Wgrad

Each runs one :func:`~dsv3lite.fp8.reference.fp8_gemm_ref` per expert on its own
slice, so its results are those of the per-expert GEMMs by construction. The slices
need the segment ends on the host, a synchronisation that only a reference may afford.
These references run wherever the Triton kernels of
:mod:`dsv3lite.fp8.grouped_kernels` cannot (CPU tensors, GPUs before sm_89), and the
kernels are tested against them. The argument checks of both grouped GEMMs live here
too; the kernels run the same checks.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .e4m3 import E4M3_DTYPE
from .reference import BLOCK_SIZE, ceil_div, fp8_gemm_ref
from .segments import ALIGN, check_ends

__all__ = ["grouped_fp8_gemm_ref", "grouped_wgrad_ref", "check_grouped_gemm",
           "check_grouped_wgrad"]


# ----------------------------------------------------------------- argument checks
def _check_e4m3(name: str, t: Any, ndim: int, shape: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != E4M3_DTYPE or t.dim() != ndim:
        what = (f"dtype {t.dtype} and shape {tuple(t.shape)}" if isinstance(t, torch.Tensor)
                else f"type {type(t).__name__}")
        raise ValueError(f"{name} has {what}: must be a {ndim}-D {shape} {E4M3_DTYPE} tensor")


def _check_scales(name: str, s: Any, expected: tuple[int, ...], meaning: str) -> None:
    if not isinstance(s, torch.Tensor) or s.dtype != torch.float32:
        raise ValueError(f"{name}.dtype={getattr(s, 'dtype', type(s).__name__)} is invalid: "
                         "scales must be a float32 tensor")
    if tuple(s.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(s.shape)}: must be {expected} ({meaning})")


def check_grouped_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor,
                       b_s: torch.Tensor, ends: torch.Tensor) -> None:
    """Raise a ValueError naming the first argument of a grouped GEMM that is wrong."""
    _check_e4m3("a", a, 2, "(M, K)")
    _check_e4m3("b", b, 3, "(E, N, K)")
    (M, K), (E, N, K_b) = a.shape, b.shape
    if K_b != K:
        raise ValueError(f"b has shape {tuple(b.shape)}: its last dim must equal a's "
                         f"K={K} (a has shape {tuple(a.shape)})")
    if E < 1:
        raise ValueError(f"b has shape {tuple(b.shape)}: needs at least one expert")
    nk = ceil_div(K, BLOCK_SIZE)
    _check_scales("a_s", a_s, (M, nk), "one scale per 1x128 tile of a, any strides")
    _check_scales("b_s", b_s, (E, ceil_div(N, BLOCK_SIZE), nk),
                  "one scale per 128x128 block of each expert's b")
    check_ends(ends, E, a.device)


def check_grouped_wgrad(dy_t: torch.Tensor, dy_t_s: torch.Tensor, x_t: torch.Tensor,
                        x_t_s: torch.Tensor, ends: torch.Tensor) -> None:
    """Raise a ValueError naming the first argument of a grouped Wgrad that is wrong."""
    _check_e4m3("dy_t", dy_t, 2, "(N, T)")
    _check_e4m3("x_t", x_t, 2, "(K, T)")
    if x_t.shape[1] != dy_t.shape[1]:
        raise ValueError(f"x_t has shape {tuple(x_t.shape)}: its token dim must equal "
                         f"dy_t's T={dy_t.shape[1]}")
    nt = ceil_div(dy_t.shape[1], BLOCK_SIZE)
    _check_scales("dy_t_s", dy_t_s, (dy_t.shape[0], nt), "one scale per 128x1 token tile")
    _check_scales("x_t_s", x_t_s, (x_t.shape[0], nt), "one scale per 128x1 token tile")
    check_ends(ends, None, dy_t.device)


def _host_ends(ends: torch.Tensor, n_rows: int) -> list[int]:
    """The segment ends as Python ints (a host sync: reference paths only), checked."""
    values = ends.tolist()
    previous = 0
    for end in values:
        if end < previous or end % ALIGN or end > n_rows:
            raise ValueError(f"ends={values} is invalid: must be non-decreasing multiples "
                             f"of {ALIGN}, at most the {n_rows} padded rows")
        previous = end
    return values


# ----------------------------------------------------------------- references
def grouped_fp8_gemm_ref(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor,
                         b_s: torch.Tensor, ends: torch.Tensor,
                         out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Grouped ``c = a @ b[e]^T`` on each expert's rows, one reference GEMM per expert.

    Args:
        a: (M, K) E4M3 rows of all experts, expert e's in [ends[e-1], ends[e]).

        a_s: (M, ceil(K/128)) fp32 scales of a's 1x128 tiles, any strides (K-major too).

        b: (E, N, K) E4M3, one (N, K) matrix per expert (any strides: Dgrad passes
            the transposed weights as a view).

        b_s: (E, ceil(N/128), ceil(K/128)) fp32 scales of b's 128x128 blocks.

        ends: (E,) integer segment ends: non-decreasing multiples of 128, <= M.

        out_dtype: Result dtype; default ``torch.get_default_dtype()``.

    Returns:
        (M, N): rows of expert e equal to ``fp8_gemm_ref(a[rows], a_s[rows], b[e],
        b_s[e])``; rows past the last end are zero.
    """
    check_grouped_gemm(a, a_s, b, b_s, ends)
    out_dtype = out_dtype or torch.get_default_dtype()
    c = torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    start = 0
    for e, end in enumerate(_host_ends(ends, a.shape[0])):
        if end > start:
            c[start:end] = fp8_gemm_ref(a[start:end], a_s[start:end], b[e], b_s[e], out_dtype)
        start = end
    return c


def grouped_wgrad_ref(dy_t: torch.Tensor, dy_t_s: torch.Tensor, x_t: torch.Tensor,
                      x_t_s: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Grouped weight gradient dW[e] = dy_e^T x_e in fp32, one reference GEMM per expert.

    Args:
        dy_t: (N, T) E4M3 output gradients, transposed (``act_quant(dy, transpose=True)``
            of the padded (T, N) gradient): the tokens run along the columns.

        dy_t_s: (N, ceil(T/128)) fp32 scales of its 128x1 token tiles.

        x_t: (K, T) E4M3 inputs, transposed the same way, with x_t_s (K, ceil(T/128)).

        ends: (E,) integer segment ends along T: non-decreasing multiples of 128, so
            that no token tile straddles two experts.

    Returns:
        (E, N, K) fp32; an expert without tokens gets zeros.
    """
    check_grouped_wgrad(dy_t, dy_t_s, x_t, x_t_s, ends)
    dw = torch.zeros(ends.numel(), dy_t.shape[0], x_t.shape[0], dtype=torch.float32,
                     device=dy_t.device)
    start = 0
    for e, end in enumerate(_host_ends(ends, dy_t.shape[1])):
        if end > start:
            tokens, tiles = slice(start, end), slice(start // ALIGN, end // ALIGN)
            dw[e] = fp8_gemm_ref(dy_t[:, tokens], dy_t_s[:, tiles], x_t[:, tokens],
                                 x_t_s[:, tiles], torch.float32)
        start = end
    return dw
