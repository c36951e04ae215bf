# mypy: disable-error-code="no-untyped-def"
# (the @triton.jit kernels here annotate only their tl.constexpr parameters, as Triton
# wants: hints on the others would change how Triton specializes them)
"""Triton kernels for fine-grained FP8: tile quantization, dequantization, block-scaled GEMM.

The same four operations as :mod:`dsv3lite.fp8.reference` ([V3] §3.3), written
the way the official ``inference/kernel.py`` writes them, and bit-compatible with the
reference wherever the hardware rounds correctly:

- ``_quant_tiles_kernel``: one scale per 1x128 tile along the columns of a strided
  (R, C) view. Handing it the transposed view of the token matrix gives the 128x1 tiles
  of the weight gradient, written out K-major in the same pass.
- ``_weight_quant_kernel`` / ``_weight_dequant_kernel``: one program per 128x128 block.
- ``_fp8_gemm_kernel``: c = a @ b^T. Per 128-wide K-block it runs one FP8 ``tl.dot`` and
  adds the partial product, times the two scales, to an fp32 accumulator: the paper's
  promotion to CUDA cores every N_C = 128 elements ([V3] §3.3.2).

Partial tiles at the edges are masked with zeros, which is the reference's zero padding.
Divisions use ``div_rn`` (IEEE round-to-nearest) so scales match the reference exactly.

Two edges the reference sets and the kernels follow:

- **NaN and ±Inf** go through as in PyTorch. ``tl.max``, ``tl.maximum`` and
  ``tl.minimum`` compile to NaN-ignoring instructions by default (``max.f32`` returns the
  other operand), which would give a tile holding a NaN a finite scale and finite
  values; every max/min here asks for ``propagate_nan=tl.PropagateNan.ALL`` instead,
  like ``torch.amax`` and ``torch.clamp``. So a tile with a NaN gets a NaN scale and
  NaN values, and a tile with ±Inf (and no NaN) gets an infinite scale: its finite
  elements quantize to ±0 and the ±Inf to NaN (∞/∞).
- **int64 offsets.** A token matrix of 2^31 elements is only 16k tokens of
  d_model 128k, or 256k tokens of 8192: every offset that is an index times a stride is
  formed in int64 (indices are cast before they are multiplied), since Triton types the
  program id, ``tl.arange`` and strides below 2^31 as int32, and their product would
  wrap around.

Importing this module imports Triton, which reads ``TRITON_INTERPRET`` at that moment:
with ``TRITON_INTERPRET=1`` the kernels run on CPU tensors through the interpreter
(fixed tile sizes; autotuning runs only when compiling for CUDA).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .e4m3 import E4M3_DTYPE, E4M3_MAX
from .reference import (AMAX_FLOOR, BLOCK_SIZE, ceil_div, check_gemm_operands,
                        check_quantizable, check_scale_fmt)

__all__ = ["INTERPRET", "act_quant_triton", "act_quant_both_triton", "weight_quant_triton",
           "weight_dequant_triton", "fp8_gemm_triton"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")
"""Whether Triton runs its interpreter (read once, when Triton builds the kernels)."""


def _squeeze_interpreted_scalars() -> None:
    """Let triton < 3.7's interpreter run these kernels with numpy >= 2.4.

    The interpreter turns a loop bound such as ``tl.cdiv(K, BLOCK_K)`` into a Python int
    with ``int()`` of a one-element array, which numpy 2.4 refuses ("only 0-dimensional
    arrays can be converted to Python scalars"); triton 3.7 squeezes the array first.
    This does the same for the interpreter of triton 3.6 (torch 2.10's). Compiled
    kernels are untouched: this runs only under ``TRITON_INTERPRET=1``.
    """
    from triton.runtime import interpreter  # optional dependency: only when interpreting

    original = interpreter._patch_lang_tensor
    if getattr(original, "squeezes_scalars", False):
        return

    def patched(tensor, scope):  # wraps triton's private hook
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.squeezes_scalars = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


if INTERPRET and tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):
    _squeeze_interpreted_scalars()
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)
_E4M3_MAX = tl.constexpr(E4M3_MAX)


@triton.jit
def _max_nan(a, b):
    """max(a, b) that returns NaN if either is NaN, as ``torch.amax`` does."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _amax(x, axis: tl.constexpr):
    """max |x| along ``axis``, NaN if any element is NaN (``tl.max`` would skip it)."""
    return tl.reduce(tl.abs(x), axis, _max_nan)


@triton.jit
def _scale(amax, POW2_SCALES: tl.constexpr):
    """s = max(amax, AMAX_FLOOR) / 448, optionally rounded up to a power of 2 (bit trick).
    A NaN amax gives a NaN scale (also rounded: see ``round_scale_to_power_of_2``)."""
    s = tl.math.div_rn(tl.maximum(amax, _AMAX_FLOOR, propagate_nan=tl.PropagateNan.ALL),
                       _E4M3_MAX)
    if POW2_SCALES:
        bits = s.to(tl.int32, bitcast=True)
        rounded = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
        s = tl.where(s != s, s, rounded)  # NaN stays NaN
    return s


@triton.jit
def _to_e4m3_range(q):
    """q clamped to [-448, 448]; NaN stays NaN, as in ``torch.clamp``."""
    return tl.minimum(tl.maximum(q, -_E4M3_MAX, propagate_nan=tl.PropagateNan.ALL),
                      _E4M3_MAX, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _quant_tiles_kernel(x_ptr, q_ptr, s_ptr, R, C, stride_xr, stride_xc, stride_qr,
                        stride_sr, stride_sc, POW2_SCALES: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """BLOCK_R rows x one 1xBLOCK_C tile of the (R, C) view x; q is row-major, s any
    layout (the wrappers write it K-major: stride_sr = 1)."""
    pid_c = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc,
                mask=mask, other=0.0).to(tl.float32)
    s = _scale(_amax(x, 1), POW2_SCALES)  # (BLOCK_R,): one per tile
    q = _to_e4m3_range(tl.math.div_rn(x, s[:, None]))
    tl.store(q_ptr + rows[:, None] * stride_qr + cols[None, :], q.to(q_ptr.dtype.element_ty),
             mask=mask)
    tl.store(s_ptr + rows * stride_sr + pid_c * stride_sc, s, mask=rows < R)


@triton.jit
def _quant_both_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, K, stride_xm, stride_xk,
                       POW2_SCALES: tl.constexpr, BLOCK: tl.constexpr):
    """One BLOCK x BLOCK tile of x (M, K), read once, quantized both ways.

    1x128 tiles (one per row): q (M, K) row-major, s K-major (ceil(K/128), M).
    128x1 tiles (one per column): qt (K, M) = the transposed layout Wgrad reads, and st
    K-major (ceil(M/128), K).
    """
    pid_m, pid_k = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)  # int64, as every offset below
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                mask=mask, other=0.0).to(tl.float32)
    s = _scale(_amax(x, 1), POW2_SCALES)  # (BLOCK,) one per row
    q = _to_e4m3_range(tl.math.div_rn(x, s[:, None]))
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], q.to(q_ptr.dtype.element_ty),
             mask=mask)
    tl.store(s_ptr + pid_k * M + rows, s, mask=rows < M)
    st = _scale(_amax(x, 0), POW2_SCALES)  # (BLOCK,) one per column
    qt = _to_e4m3_range(tl.math.div_rn(x, st[None, :]))
    tl.store(qt_ptr + cols[None, :] * M + rows[:, None], qt.to(qt_ptr.dtype.element_ty),
             mask=mask)
    tl.store(st_ptr + pid_m * K + cols, st, mask=cols < K)


@triton.jit
def _weight_quant_kernel(w_ptr, q_ptr, s_ptr, N, K, stride_wn, stride_wk,
                         POW2_SCALES: tl.constexpr, BLOCK: tl.constexpr):
    """One BLOCK x BLOCK block of w (N, K) -> E4M3 block and one scale."""
    pid_n, pid_k = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)  # int64
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
                mask=mask, other=0.0).to(tl.float32)
    s = _scale(tl.reduce(_amax(w, 1), 0, _max_nan), POW2_SCALES)
    q = _to_e4m3_range(tl.math.div_rn(w, s))
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + pid_n * tl.cdiv(K, BLOCK) + pid_k, s)


@triton.jit
def _weight_dequant_kernel(q_ptr, s_ptr, y_ptr, N, K, stride_qn, stride_qk, stride_sn,
                           stride_sk, BLOCK: tl.constexpr):
    """y = q * s for one BLOCK x BLOCK block (the official ``weight_dequant``)."""
    pid_n, pid_k = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)  # int64
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    q = tl.load(q_ptr + rows[:, None] * stride_qn + cols[None, :] * stride_qk, mask=mask)
    s = tl.load(s_ptr + pid_n * stride_sn + pid_k * stride_sk)
    y = q.to(tl.float32) * s
    tl.store(y_ptr + rows[:, None] * K + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, M, N, K, M_BUCKET, K_BUCKET,
                     stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                     stride_asm, stride_ask, stride_bsn, stride_bsk,
                     B_SCALE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """c[M, N] = sum over K-blocks of (a_blk @ b_blk^T) * a_s[m, k] * b_s[n // B_SCALE_ROWS, k].

    ``M_BUCKET`` and ``K_BUCKET`` (the next powers of 2 of M and K, capped) are only
    autotuning keys: a Wgrad GEMM's K is the token count, which changes every step in
    an MoE layer, and a raw K in the key would re-tune on every new value.
    """
    # Grouped launch order: GROUP_M row-tiles share their b columns while in L2.
    pid = tl.program_id(0)
    n_pid_m, n_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = pid // (GROUP_M * n_pid_n) * GROUP_M
    group_m = min(n_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_pid_n)) % group_m
    pid_n = (pid % (GROUP_M * n_pid_n)) // group_m
    # Rows past M and columns past N wrap around (loads stay in bounds); never stored.
    # Offsets in int64 (an index times a stride may pass 2^31); the K step advances the
    # pointers by BLOCK_K strides, also formed in int64.
    offs_m = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    offs_n = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    step_a = tl.full((), BLOCK_K, tl.int64) * stride_ak
    step_b = tl.full((), BLOCK_K, tl.int64) * stride_bk
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BM, BK)
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk  # (BK, BN)
    a_s_ptrs = a_s_ptr + offs_m * stride_asm
    b_s_ptrs = b_s_ptr + (offs_n // B_SCALE_ROWS) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        in_k = offs_k < K - k * BLOCK_K  # the last K-block may be partial: zero-pad it
        a = tl.load(a_ptrs, mask=in_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=in_k[:, None], other=0.0)
        a_s = tl.load(a_s_ptrs)
        b_s = tl.load(b_s_ptrs)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]  # promote to fp32 every 128 K
        a_ptrs += step_a
        b_ptrs += step_b
        a_s_ptrs += stride_ask
        b_s_ptrs += stride_bsk
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


# Tile shapes for H100-class GPUs: BLOCK_K is fixed at the 128 of the scale groups.
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_stages=stages,
                  num_warps=warps)
    for bm, bn, stages, warps in [(128, 128, 3, 8), (128, 128, 4, 8), (64, 128, 3, 4),
                                  (64, 128, 4, 4), (64, 128, 5, 4), (128, 64, 4, 4),
                                  (64, 64, 4, 4), (32, 128, 4, 4), (16, 64, 4, 4)]
]
# Token counts never enter the key raw (see _fp8_gemm_kernel): M and K are bucketed.
_GEMM_AUTOTUNE_KEY = ["M_BUCKET", "N", "K_BUCKET", "B_SCALE_ROWS"]
if INTERPRET:  # the interpreter cannot autotune: one fixed, modest tile
    _fp8_gemm = _fp8_gemm_kernel
    _GEMM_FIXED = dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=8)
else:
    _fp8_gemm = triton.autotune(_GEMM_CONFIGS, key=_GEMM_AUTOTUNE_KEY)(_fp8_gemm_kernel)
    _GEMM_FIXED = {}
_QUANT_ROWS = 64  # rows (1x128 tiles) per quantization program


def act_quant_triton(x: torch.Tensor, scale_fmt: Optional[str] = None,
                     transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`~dsv3lite.fp8.reference.act_quant_ref` (same contract).

    Same values as the reference; the scales come K-major (a transposed view of a
    contiguous (ceil(C/128), R) tensor), so a GEMM's K step reads the scales of
    consecutive rows from consecutive addresses, the layout ``torch._scaled_mm`` expects.
    """
    check_quantizable("x", x)
    check_scale_fmt(scale_fmt)
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    view = x2.t() if transpose else x2  # tiles run along the columns of this view
    R, C = view.shape
    q = torch.empty((R, C), dtype=E4M3_DTYPE, device=x.device)
    s = torch.empty((ceil_div(C, BLOCK_SIZE), R), dtype=torch.float32, device=x.device).t()
    if q.numel():
        grid = (triton.cdiv(R, _QUANT_ROWS), triton.cdiv(C, BLOCK_SIZE))
        _quant_tiles_kernel[grid](view, q, s, R, C, view.stride(0), view.stride(1), C,
                                  s.stride(0), s.stride(1),
                                  POW2_SCALES=scale_fmt == "ue8m0",
                                  BLOCK_R=_QUANT_ROWS, BLOCK_C=BLOCK_SIZE, num_warps=8)
    if transpose:
        return q, s
    return q.view(x.shape), s.view(*x.shape[:-1], -1)


def act_quant_both_triton(x: torch.Tensor, scale_fmt: Optional[str] = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``act_quant_triton(x)`` and ``act_quant_triton(x, transpose=True)`` in one pass
    that reads x once (Fprop's or Dgrad's 1x128 tiles plus Wgrad's 128x1 tiles).

    Returns:
        ``(q, s, qt, st)``: q like x and s (..., ceil(K/128)); qt (K, M) and
        st (K, ceil(M/128)); both scale tensors K-major views, values equal to the
        two separate calls.
    """
    check_quantizable("x", x)
    check_scale_fmt(scale_fmt)
    x2 = x.reshape(-1, x.shape[-1])
    M, K = x2.shape
    q = torch.empty((M, K), dtype=E4M3_DTYPE, device=x.device)
    qt = torch.empty((K, M), dtype=E4M3_DTYPE, device=x.device)
    s = torch.empty((ceil_div(K, BLOCK_SIZE), M), dtype=torch.float32, device=x.device)
    st = torch.empty((ceil_div(M, BLOCK_SIZE), K), dtype=torch.float32, device=x.device)
    if q.numel():
        grid = (triton.cdiv(M, BLOCK_SIZE), triton.cdiv(K, BLOCK_SIZE))
        _quant_both_kernel[grid](x2, q, s, qt, st, M, K, x2.stride(0), x2.stride(1),
                                 POW2_SCALES=scale_fmt == "ue8m0", BLOCK=BLOCK_SIZE,
                                 num_warps=8)
    return q.view(x.shape), s.t().view(*x.shape[:-1], -1), qt, st.t()


def weight_quant_triton(w: torch.Tensor,
                        scale_fmt: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`~dsv3lite.fp8.reference.weight_quant_ref`."""
    check_quantizable("w", w, ndim=2)
    check_scale_fmt(scale_fmt)
    N, K = w.shape
    q = torch.empty((N, K), dtype=E4M3_DTYPE, device=w.device)
    s = torch.empty((ceil_div(N, BLOCK_SIZE), ceil_div(K, BLOCK_SIZE)), dtype=torch.float32,
                    device=w.device)
    if q.numel():
        _weight_quant_kernel[s.shape](w, q, s, N, K, w.stride(0), w.stride(1),
                                      POW2_SCALES=scale_fmt == "ue8m0", BLOCK=BLOCK_SIZE,
                                      num_warps=8)
    return q, s


def weight_dequant_triton(q: torch.Tensor, s: torch.Tensor,
                          out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Triton version of :func:`~dsv3lite.fp8.reference.weight_dequant_ref`."""
    if q.dtype != E4M3_DTYPE or q.dim() != 2:
        raise ValueError(f"q has dtype {q.dtype} and shape {tuple(q.shape)}: "
                         f"must be a 2-D {E4M3_DTYPE} tensor")
    N, K = q.shape
    expected = (ceil_div(N, BLOCK_SIZE), ceil_div(K, BLOCK_SIZE))
    if s.shape != expected:
        raise ValueError(f"s has shape {tuple(s.shape)}: must be {expected} for q of "
                         f"shape {(N, K)} in 128x128 blocks")
    y = torch.empty((N, K), dtype=out_dtype or torch.get_default_dtype(), device=q.device)
    if y.numel():
        _weight_dequant_kernel[expected](q, s, y, N, K, q.stride(0), q.stride(1), s.stride(0),
                                         s.stride(1), BLOCK=BLOCK_SIZE, num_warps=8)
    return y


def fp8_gemm_triton(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                    out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Triton version of :func:`~dsv3lite.fp8.reference.fp8_gemm_ref` (c = a @ b^T)."""
    b_scale_rows = check_gemm_operands(a, a_s, b, b_s)
    (N, K), nk = b.shape, a_s.shape[-1]
    a2, a_s2 = a.reshape(-1, K), a_s.reshape(-1, nk)
    M = a2.shape[0]
    c = torch.empty((M, N), dtype=out_dtype or torch.get_default_dtype(), device=a.device)
    if M == 0 or N == 0:
        return c.view(*a.shape[:-1], N)
    if K == 0:
        return c.zero_().view(*a.shape[:-1], N)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _fp8_gemm[grid](a2, b, c, a_s2, b_s, M, N, K, min(triton.next_power_of_2(M), 8192),
                    min(triton.next_power_of_2(K), 16384),
                    a2.stride(0), a2.stride(1), b.stride(0), b.stride(1), c.stride(0),
                    c.stride(1), a_s2.stride(0), a_s2.stride(1), b_s.stride(0), b_s.stride(1),
                    B_SCALE_ROWS=b_scale_rows, BLOCK_K=BLOCK_SIZE, **_GEMM_FIXED)
    return c.view(*a.shape[:-1], N)
