# mypy: disable-error-code="no-untyped-def"
# (the @triton.jit kernels here annotate only their tl.constexpr parameters, as Triton
# wants: hints on the others would change how Triton specializes them)
"""Triton kernels of the grouped FP8 GEMMs: all routed experts in one launch ([V3] §3.3).

Written like :mod:`dsv3lite.fp8.kernels`' GEMM (one FP8 ``tl.dot`` per 128-wide K-block,
promoted to fp32 with the two scales, [V3] §3.3.2), on operands in 128-aligned segments
(:mod:`dsv3lite.fp8.segments`), and checked against :mod:`dsv3lite.fp8.grouped_reference`:

- ``_grouped_fp8_gemm_kernel`` (Fprop, Dgrad): c = a @ b[e]^T, the expert of each
  128-row segment read from a segment -> expert map computed on the device; tiles past
  the last segment skip their K loop;
- ``_grouped_fp8_wgrad_kernel`` (Wgrad): grid (tiles, E), each program summing its
  expert's 128-token blocks, their bounds loaded from the segment ends on the device.

Neither reads anything back to the host. Every offset that is an index times a stride
is formed in int64 (indices cast before they are multiplied), so operands may pass 2^31
elements. Scales may have any strides; K-major activation
scales (:func:`~dsv3lite.fp8.segments.k_major`) are one contiguous load per K step.

**Bucketed autotune keys.** The token count changes at every step in an MoE layer.
A raw count in an autotuning key would re-benchmark every kernel configuration for each
new value; the keys hold it rounded up to a power of 2 and capped (as
``_GEMM_AUTOTUNE_KEY`` in :mod:`dsv3lite.fp8.kernels` does).

Triton is imported only when a Triton kernel is first needed (``_triton_kernels``):
on a CUDA tensor for which :func:`~dsv3lite.fp8.ops.use_triton` holds, or in the
interpreted tests. Importing this module never imports Triton.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any, Optional

import torch

from .grouped_reference import check_grouped_gemm, check_grouped_wgrad
from .reference import BLOCK_SIZE, ceil_div
from .segments import ALIGN

__all__ = ["BUCKET_CAP", "grouped_fp8_gemm_triton", "grouped_wgrad_triton"]

BUCKET_CAP = 16384
"""Token counts in autotuning keys are rounded up to a power of 2, at most this."""
_GROUPED_GEMM_KEY = ["M_BUCKET", "N", "K", "E"]
"""Autotuning key of the Fprop/Dgrad kernel: M (padded tokens) only bucketed."""
_GROUPED_WGRAD_KEY = ["T_BUCKET", "N", "K", "E"]
"""Autotuning key of the Wgrad kernel: T (padded tokens, its inner dim) only bucketed."""
triton: Any  # the module, bound by _triton_kernels() on first use (optional dependency)
tl: Any  # triton.language, bound there too
GEMM_TILES = [(128, 128, 3, 8), (128, 128, 4, 8), (64, 128, 4, 4), (128, 64, 4, 4),
              (64, 64, 4, 4), (32, 128, 4, 4)]
"""(BLOCK_M, BLOCK_N, num_stages, num_warps) the Fprop/Dgrad autotuner may pick on CUDA.
BLOCK_M must divide the 128-row segments: 32, 64 or 128."""
WGRAD_TILES = [(128, 128, 3, 8), (128, 128, 4, 8), (64, 128, 4, 4), (128, 64, 4, 4),
               (64, 64, 4, 4)]
"""(BLOCK_N, BLOCK_K, num_stages, num_warps) the Wgrad autotuner may pick on CUDA."""


# ----------------------------------------------------------------- Triton kernels
def _bucket(n: int, cap: int = BUCKET_CAP) -> int:
    """n rounded up to a power of 2 (1 for n <= 1), at most ``cap``: an autotuning key."""
    return min(1 << max(n - 1, 0).bit_length(), cap)


@functools.cache
def _triton_kernels() -> SimpleNamespace:
    """Import Triton and build the two grouped kernels (on the first call only).

    The kernels are defined in here so that importing this module never imports
    Triton. ``triton`` and ``tl`` become module globals: the interpreter and the
    compiler both look the kernels' names up there.
    """
    global triton, tl
    import triton  # optional dependency: Triton, loaded on first use
    import triton.language as tl  # optional dependency, as above

    # optional dependency: .kernels imports Triton at its top, so it loads on first use too
    from .kernels import INTERPRET

    @triton.jit
    def _grouped_fp8_gemm_kernel(
            a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, seg_expert_ptr, M, N, K, E, M_BUCKET,
            stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
            stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
            SEGMENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """c[rows of expert e] = Σ_k (a_blk @ b[e]_blk^T) · a_s[m, k] · b_s[e, n // 128, k].

        Every SEGMENT (128) rows belong to one expert, ``seg_expert[m // SEGMENT]`` (E for
        the padding past the last end). BLOCK_M divides SEGMENT, so a tile has one
        expert. ``M_BUCKET`` is only an autotuning key (bucketed padded token count).
        """
        # Grouped launch order: GROUP_M row-tiles share their b columns while in L2.
        pid = tl.program_id(0)
        n_pid_m, n_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        first_m = pid // (GROUP_M * n_pid_n) * GROUP_M
        group_m = min(n_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * n_pid_n)) % group_m
        pid_n = (pid % (GROUP_M * n_pid_n)) // group_m
        expert = tl.load(seg_expert_ptr + (pid_m * BLOCK_M) // SEGMENT)
        n_k = tl.where(expert < E, tl.cdiv(K, BLOCK_K), 0)  # padding tiles: no K loop
        expert = tl.minimum(expert, E - 1).to(tl.int64)  # keeps every address in bounds
        # Rows past M and columns past N wrap around (loads stay in bounds); never stored.
        offs_m = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
        offs_n = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
        step_a = tl.full((), BLOCK_K, tl.int64) * stride_ak  # K step, in int64 too
        step_b = tl.full((), BLOCK_K, tl.int64) * stride_bk
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BM, BK)
        b_ptrs = (b_ptr + expert * stride_be + offs_n[None, :] * stride_bn
                  + offs_k[:, None] * stride_bk)  # (BK, BN)
        a_s_ptrs = a_s_ptr + offs_m * stride_asm  # K-major: BLOCK_M adjacent scales
        b_s_ptrs = b_s_ptr + expert * stride_bse + (offs_n // BLOCK_K) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, n_k):
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

    @triton.jit
    def _grouped_fp8_wgrad_kernel(
            dy_ptr, x_ptr, dw_ptr, dy_s_ptr, x_s_ptr, ends_ptr, N, K, T, E, T_BUCKET,
            stride_dyn, stride_dyt, stride_xk, stride_xt, stride_we, stride_wn, stride_wk,
            stride_dysn, stride_dyst, stride_xsk, stride_xst,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
        """dW[e] tile = Σ over expert e's 128-token blocks of (dy^T_blk @ x_blk) · scales.

        Grid: (N tiles x K tiles, E). The token loop's bounds come from ``ends`` on the
        device (whole 128-token blocks, no masks: ends are multiples of 128, clamped to
        T); an expert without tokens stores zeros. ``E`` and ``T_BUCKET`` are only
        autotuning keys.
        """
        pid, expert = tl.program_id(0), tl.program_id(1)
        n_pid_k = tl.cdiv(K, BLOCK_K)
        pid_n, pid_k = pid // n_pid_k, pid % n_pid_k
        # The expert's 128-token blocks [first, last): ends are multiples of BLOCK_T.
        first = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0) // BLOCK_T
        last = tl.minimum(tl.load(ends_ptr + expert), T) // BLOCK_T  # never past T
        offs_n = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
        offs_k = ((pid_k * BLOCK_K + tl.arange(0, BLOCK_K)) % K).to(tl.int64)
        offs_t = tl.arange(0, BLOCK_T)
        dy_s_ptrs = dy_s_ptr + offs_n * stride_dysn + first.to(tl.int64) * stride_dyst
        x_s_ptrs = x_s_ptr + offs_k * stride_xsk + first.to(tl.int64) * stride_xst
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for blk in range(first, last):  # BLOCK_T = 128 tokens: one scale per block
            tokens = (blk * BLOCK_T + offs_t).to(tl.int64)
            dy = tl.load(dy_ptr + offs_n[:, None] * stride_dyn + tokens[None, :] * stride_dyt)
            x = tl.load(x_ptr + offs_k[None, :] * stride_xk + tokens[:, None] * stride_xt)
            dy_s = tl.load(dy_s_ptrs)  # (BN,) the scales of token block blk
            x_s = tl.load(x_s_ptrs)  # (BK,)
            dy_s_ptrs += stride_dyst
            x_s_ptrs += stride_xst
            acc += tl.dot(dy, x) * dy_s[:, None] * x_s[None, :]  # fp32 promotion per block
        rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        cols = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        tl.store(dw_ptr + expert.to(tl.int64) * stride_we + rows[:, None] * stride_wn
                 + cols[None, :] * stride_wk, acc,
                 mask=(rows[:, None] < N) & (cols[None, :] < K))

    if INTERPRET:  # the interpreter cannot autotune: one fixed, modest tile
        return SimpleNamespace(
            _grouped_fp8_gemm_kernel=_grouped_fp8_gemm_kernel,
            _grouped_fp8_wgrad_kernel=_grouped_fp8_wgrad_kernel,
            gemm=_grouped_fp8_gemm_kernel, gemm_fixed=dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=8),
            wgrad=_grouped_fp8_wgrad_kernel, wgrad_fixed=dict(BLOCK_N=64, BLOCK_K=64))
    gemm_configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8},
                                  num_stages=stages, num_warps=warps)
                    for bm, bn, stages, warps in GEMM_TILES]
    wgrad_configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_stages=stages,
                                   num_warps=warps)
                     for bn, bk, stages, warps in WGRAD_TILES]
    return SimpleNamespace(
        _grouped_fp8_gemm_kernel=_grouped_fp8_gemm_kernel,
        _grouped_fp8_wgrad_kernel=_grouped_fp8_wgrad_kernel,
        gemm=triton.autotune(gemm_configs, key=_GROUPED_GEMM_KEY)(_grouped_fp8_gemm_kernel),
        gemm_fixed={},
        wgrad=triton.autotune(wgrad_configs, key=_GROUPED_WGRAD_KEY)(_grouped_fp8_wgrad_kernel),
        wgrad_fixed={})


def __getattr__(name: str) -> Any:
    """``_grouped_fp8_gemm_kernel`` / ``_grouped_fp8_wgrad_kernel``, built on first access."""
    if name in ("_grouped_fp8_gemm_kernel", "_grouped_fp8_wgrad_kernel"):
        return getattr(_triton_kernels(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def grouped_fp8_gemm_triton(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor,
                            b_s: torch.Tensor, ends: torch.Tensor,
                            out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Triton version of :func:`~dsv3lite.fp8.grouped_reference.grouped_fp8_gemm_ref`:
    one launch for all experts.

    Nothing is read back to the host; ``ends`` are trusted to be non-decreasing
    multiples of 128, at most M (what :func:`~dsv3lite.fp8.segments.pad_segments`
    returns). ``a_s`` should be K-major (:func:`~dsv3lite.fp8.segments.k_major`) for
    contiguous scale loads; any strides are correct.
    """
    check_grouped_gemm(a, a_s, b, b_s, ends)
    kernels = _triton_kernels()
    (M, K), (E, N, _) = a.shape, b.shape
    c = torch.empty((M, N), dtype=out_dtype or torch.get_default_dtype(), device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    segment_starts = torch.arange(0, M, ALIGN, device=a.device)
    seg_expert = torch.searchsorted(ends.long().contiguous(), segment_starts,
                                    right=True).to(torch.int32)  # E: past the last end

    def grid(meta):
        return (ceil_div(M, meta["BLOCK_M"]) * ceil_div(N, meta["BLOCK_N"]),)

    kernels.gemm[grid](a, b, c, a_s, b_s, seg_expert, M, N, K, E, _bucket(M),
                       a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
                       c.stride(0), c.stride(1), a_s.stride(0), a_s.stride(1),
                       b_s.stride(0), b_s.stride(1), b_s.stride(2),
                       SEGMENT=ALIGN, BLOCK_K=BLOCK_SIZE, **kernels.gemm_fixed)
    return c


def grouped_wgrad_triton(dy_t: torch.Tensor, dy_t_s: torch.Tensor, x_t: torch.Tensor,
                         x_t_s: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Triton version of :func:`~dsv3lite.fp8.grouped_reference.grouped_wgrad_ref`:
    one launch, grid (tiles, E).

    The token loop of each program runs over its expert's segment, bounds loaded from
    ``ends`` on the device (trusted to be non-decreasing multiples of 128, <= T).
    """
    check_grouped_wgrad(dy_t, dy_t_s, x_t, x_t_s, ends)
    kernels = _triton_kernels()
    E, (N, T), K = ends.numel(), dy_t.shape, x_t.shape[0]
    dw = torch.empty((E, N, K), dtype=torch.float32, device=dy_t.device)
    if N == 0 or K == 0:
        return dw
    ends32 = ends.to(torch.int32).contiguous()

    def grid(meta):
        return (ceil_div(N, meta["BLOCK_N"]) * ceil_div(K, meta["BLOCK_K"]), E)

    kernels.wgrad[grid](dy_t, x_t, dw, dy_t_s, x_t_s, ends32, N, K, T, E, _bucket(T),
                        dy_t.stride(0), dy_t.stride(1), x_t.stride(0), x_t.stride(1),
                        dw.stride(0), dw.stride(1), dw.stride(2), dy_t_s.stride(0),
                        dy_t_s.stride(1), x_t_s.stride(0), x_t_s.stride(1),
                        BLOCK_T=ALIGN, **kernels.wgrad_fixed)
    return dw
