"""Grouped block-scaled FP8 GEMMs: all routed experts of an MoE layer in one launch ([V3] §3.3).

The routed experts of one MoE layer are E small Linears, each fed a different,
data-dependent slice of the tokens. Run one at a time, they cost E launches per GEMM and
a host synchronisation to learn the slice sizes. :class:`~dsv3lite.moe.GroupedExperts`
avoids both in high precision with ``torch._grouped_mm``; this module does the same for
the FP8 path, for each of the three GEMMs of training ([V3] §3.3, Fig. 6), expert e
seeing only its own tokens:

    Fprop  y_e  = x_e  · W_e^T     x in 1x128 tiles,             W_e in 128x128 blocks
    Dgrad  dx_e = dy_e · W_e       dy in 1x128 tiles,            W_e^T in 128x128 blocks
    Wgrad  dW_e = dy_e^T · x_e     dy and x in 128x1 tiles (along the tokens), fp32 out

**128-aligned segments.** :func:`pad_segments` copies the tokens (sorted by expert)
into segments that start at multiples of 128, filling the gaps with zero rows. Then
every 128-row tile of the token matrix belongs to exactly one expert, and:

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
the last segment), which the GEMM kernel skips without computing.

**K-major activation scales.** At each 128-wide K step a GEMM program needs the scales
of its ``BLOCK_M`` rows. Stored as a (ceil(K/128), M) contiguous tensor, handed to the
GEMM as its transposed (M, ceil(K/128)) view with strides (1, M), those scales are one
contiguous load: the column-major layout ``torch._scaled_mm`` expects for block-wise
scales. The Triton quantizers write them that way (:mod:`dsv3lite.fp8.kernels`); the reference
writes (M, ceil(K/128)) row-major, and :func:`k_major` re-lays such scales (a copy of
M·K/128 floats, none when they are K-major already). The kernels read any strides.

**Bucketed autotune keys.** The token count changes at every step in an MoE layer.
A raw count in an autotuning key would re-benchmark every kernel configuration for each
new value; the keys hold it rounded up to a power of 2 and capped (as
``_GEMM_AUTOTUNE_KEY`` in :mod:`dsv3lite.fp8.kernels` does).

Triton is imported only when a Triton kernel is first needed: on a CUDA tensor for which
:func:`~dsv3lite.fp8.ops.use_triton` holds, or in the interpreted tests. Everywhere else
the plain-PyTorch references below run, one expert at a time.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .e4m3 import E4M3_DTYPE
from .ops import act_quant, act_quant_both, output_dtype, use_triton, weight_quant
from .reference import BLOCK_SIZE, ceil_div, fp8_gemm_ref

__all__ = ["ALIGN", "padded_rows", "pad_segments", "unpad", "k_major", "grouped_weight_quant",
           "grouped_fp8_gemm_ref", "grouped_wgrad_ref", "grouped_fp8_gemm_triton",
           "grouped_wgrad_triton", "grouped_fp8_gemm", "grouped_wgrad", "grouped_fp8_linear",
           "grouped_fp8_experts"]

ALIGN = BLOCK_SIZE
"""Segment alignment: every expert's rows start at a multiple of 128 (one Wgrad tile)."""
BUCKET_CAP = 16384
"""Token counts in autotuning keys are rounded up to a power of 2, at most this."""
_GROUPED_GEMM_KEY = ["M_BUCKET", "N", "K", "E"]
"""Autotuning key of the Fprop/Dgrad kernel: M (padded tokens) only bucketed."""
_GROUPED_WGRAD_KEY = ["T_BUCKET", "N", "K", "E"]
"""Autotuning key of the Wgrad kernel: T (padded tokens, its inner dim) only bucketed."""
_force_triton = False
"""Tests set this in an interpreted child process to send CPU tensors to the kernels."""
_INTEGER_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------- segments and layout
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


def _check_counts(counts: Any, n_rows: Optional[int], device: torch.device) -> None:
    if not isinstance(counts, torch.Tensor) or counts.dtype not in _INTEGER_DTYPES \
            or counts.dim() != 1 or counts.numel() < 1:
        what = (f"a {counts.dtype} tensor of shape {tuple(counts.shape)}"
                if isinstance(counts, torch.Tensor) else type(counts).__name__)
        raise ValueError(f"counts is {what}: must be a 1-D int32/int64 tensor with one "
                         "entry (tokens) per expert")
    if counts.device != device:
        raise ValueError(f"counts is on {counts.device}: must be on x's device {device}")
    if n_rows is not None and counts.device.type == "cpu":  # checkable without a sync
        if bool((counts < 0).any()) or int(counts.sum()) != n_rows:
            raise ValueError(f"counts={counts.tolist()} is invalid: must be >= 0 and sum "
                             f"to the number of rows of x, {n_rows}")


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
        align: Segment alignment; the FP8 GEMMs of this module need 128.

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
    _check_counts(counts, x.shape[0], x.device)
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


def grouped_weight_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize stacked expert weights in 128x128 blocks, one quantizer call for all.

    Args:
        w: (E, N, K) high-precision weights, expert e's laid out like ``nn.Linear.weight``.

    Returns:
        ``(q, s)``: q (E, N, K) E4M3 (a view with row stride K and expert stride
        ceil(N/128)·128·K) and s (E, ceil(N/128), ceil(K/128)) fp32, equal to
        ``weight_quant(w[e])`` for every e. Rows are zero-padded to whole blocks
        first, so no block straddles two experts.
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 3:
        raise ValueError(f"w has shape {tuple(getattr(w, 'shape', ()))}: must be 3-D "
                         "(E, N, K), the stacked weights of E experts")
    E, N, K = w.shape
    n_padded = ceil_div(N, BLOCK_SIZE) * BLOCK_SIZE
    stacked = F.pad(w, (0, 0, 0, n_padded - N)) if n_padded != N else w
    q, s = weight_quant(stacked.reshape(E * n_padded, K))
    return q.view(E, n_padded, K)[:, :N], s.view(E, n_padded // BLOCK_SIZE, -1)


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


def _check_ends(ends: Any, n_experts: Optional[int], device: torch.device) -> None:
    """``n_experts=None``: any number of experts >= 1."""
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


def _check_grouped_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor,
                        b_s: torch.Tensor, ends: torch.Tensor) -> None:
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
    _check_ends(ends, E, a.device)


def _check_grouped_wgrad(dy_t: torch.Tensor, dy_t_s: torch.Tensor, x_t: torch.Tensor,
                         x_t_s: torch.Tensor, ends: torch.Tensor) -> None:
    _check_e4m3("dy_t", dy_t, 2, "(N, T)")
    _check_e4m3("x_t", x_t, 2, "(K, T)")
    if x_t.shape[1] != dy_t.shape[1]:
        raise ValueError(f"x_t has shape {tuple(x_t.shape)}: its token dim must equal "
                         f"dy_t's T={dy_t.shape[1]}")
    nt = ceil_div(dy_t.shape[1], BLOCK_SIZE)
    _check_scales("dy_t_s", dy_t_s, (dy_t.shape[0], nt), "one scale per 128x1 token tile")
    _check_scales("x_t_s", x_t_s, (x_t.shape[0], nt), "one scale per 128x1 token tile")
    _check_ends(ends, None, dy_t.device)


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
    _check_grouped_gemm(a, a_s, b, b_s, ends)
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
    _check_grouped_wgrad(dy_t, dy_t_s, x_t, x_t_s, ends)
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
    import triton
    import triton.language as tl

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
        offs_k = tl.arange(0, BLOCK_K)
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
            a_s = tl.load(a_s_ptrs + k * stride_ask)
            b_s = tl.load(b_s_ptrs + k * stride_bsk)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]  # promote to fp32 every 128 K
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
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
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for blk in range(first, last):  # BLOCK_T = 128 tokens: one scale per block
            tokens = (blk * BLOCK_T + offs_t).to(tl.int64)
            dy = tl.load(dy_ptr + offs_n[:, None] * stride_dyn + tokens[None, :] * stride_dyt)
            x = tl.load(x_ptr + offs_k[None, :] * stride_xk + tokens[:, None] * stride_xt)
            dy_s = tl.load(dy_s_ptr + offs_n * stride_dysn + blk * stride_dyst)  # (BN,)
            x_s = tl.load(x_s_ptr + offs_k * stride_xsk + blk * stride_xst)  # (BK,)
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
    # BLOCK_M must divide the 128-row segments: 32, 64 or 128.
    gemm_configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8},
                                  num_stages=stages, num_warps=warps)
                    for bm, bn, stages, warps in [(128, 128, 3, 8), (128, 128, 4, 8),
                                                  (64, 128, 4, 4), (128, 64, 4, 4),
                                                  (64, 64, 4, 4), (32, 128, 4, 4)]]
    wgrad_configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_stages=stages,
                                   num_warps=warps)
                     for bn, bk, stages, warps in [(128, 128, 3, 8), (128, 128, 4, 8),
                                                   (64, 128, 4, 4), (128, 64, 4, 4),
                                                   (64, 64, 4, 4)]]
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
    """Triton version of :func:`grouped_fp8_gemm_ref`: one launch for all experts.

    Nothing is read back to the host; ``ends`` are trusted to be non-decreasing
    multiples of 128, at most M (what :func:`pad_segments` returns). ``a_s`` should be
    K-major (:func:`k_major`) for contiguous scale loads; any strides are correct.
    """
    _check_grouped_gemm(a, a_s, b, b_s, ends)
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
    """Triton version of :func:`grouped_wgrad_ref`: one launch, grid (tiles, E).

    The token loop of each program runs over its expert's segment, bounds loaded from
    ``ends`` on the device (trusted to be non-decreasing multiples of 128, <= T).
    """
    _check_grouped_wgrad(dy_t, dy_t_s, x_t, x_t_s, ends)
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


# ----------------------------------------------------------------- dispatch
def _triton_path(t: torch.Tensor) -> bool:
    return _force_triton or use_triton(t)


def grouped_fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                     ends: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Grouped block-scaled FP8 GEMM: Triton on sm_89+ GPUs, the reference elsewhere.

    Args:
        a, a_s, b, b_s, ends, out_dtype: As in :func:`grouped_fp8_gemm_ref`. On the
            Triton path ``ends`` are not checked (that would need a host sync), and
            K-major ``a_s`` (:func:`k_major`) loads fastest.

    Returns:
        (M, N) in ``out_dtype`` (default ``torch.get_default_dtype()``).
    """
    if _triton_path(a):
        return grouped_fp8_gemm_triton(a, a_s, b, b_s, ends, out_dtype)
    return grouped_fp8_gemm_ref(a, a_s, b, b_s, ends, out_dtype)


def grouped_wgrad(dy_t: torch.Tensor, dy_t_s: torch.Tensor, x_t: torch.Tensor,
                  x_t_s: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Grouped FP8 weight gradient: Triton on sm_89+ GPUs, the reference elsewhere.

    Args:
        dy_t, dy_t_s, x_t, x_t_s, ends: As in :func:`grouped_wgrad_ref` (``ends`` not
            checked on the Triton path).

    Returns:
        (E, N, K) fp32.
    """
    if _triton_path(dy_t):
        return grouped_wgrad_triton(dy_t, dy_t_s, x_t, x_t_s, ends)
    return grouped_wgrad_ref(dy_t, dy_t_s, x_t, x_t_s, ends)


def _gemm_scales(s: torch.Tensor) -> torch.Tensor:
    """K-major scales for the Triton kernels; the reference takes them as they are."""
    return k_major(s) if _triton_path(s) else s


# ----------------------------------------------------------------- autograd
def _quantized_experts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grouped_weight_quant(weight), once per optimizer step inside
    :func:`~dsv3lite.fp8.linear.fp8_weight_cache`."""
    from .linear import quantized_weight  # linear imports the model modules: import late

    return quantized_weight(weight, grouped_weight_quant)


def _grouped_fprop(x_q: torch.Tensor, x_s: torch.Tensor, weight: torch.Tensor,
                   ends: torch.Tensor, out_dtype: torch.dtype):
    """Fprop for all experts from x's 1x128 tiles: (M, N) output, plus the quantized
    weights for Dgrad."""
    w_q, w_s = _quantized_experts(weight)  # 128x128 blocks, every expert at once
    return grouped_fp8_gemm(x_q, _gemm_scales(x_s), w_q, w_s, ends, out_dtype), w_q, w_s


class _GroupedFP8LinearFunction(torch.autograd.Function):
    """y[e-rows] = x[e-rows] W[e]^T with Fprop, Dgrad and Wgrad as grouped FP8 GEMMs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor,
                ends: torch.Tensor) -> torch.Tensor:
        needs_dx, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # 128x1 tiles of the padded x: segments are 128-aligned, so per expert these are
        # the tiles of that expert's tokens alone (quantized from the high-precision x,
        # in the same pass as the 1x128 tiles of Fprop).
        if needs_dw:
            x_q, x_s, xt_q, xt_s = act_quant_both(x)
        else:
            (x_q, x_s), xt_q, xt_s = act_quant(x), None, None
        y, w_q, w_s = _grouped_fprop(x_q, x_s, weight, ends, output_dtype(x))
        ctx.save_for_backward(xt_q, xt_s, w_q if needs_dx else None,
                              w_s if needs_dx else None, ends)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        xt_q, xt_s, w_q, w_s, ends = ctx.saved_tensors
        dx = dw = None
        needs_dx, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if needs_dx and needs_dw:  # 1x128 tiles (Dgrad's K is N) and 128x1, one read
            dy_q, dy_s, dyt_q, dyt_s = act_quant_both(grad_y)
        elif needs_dx:
            dy_q, dy_s = act_quant(grad_y)
        elif needs_dw:
            dyt_q, dyt_s = act_quant(grad_y, transpose=True)
        if needs_dx:
            # W[e]^T (K, N) in blocks. The kernels take strides, but a contiguous copy
            # keeps the tensor cores' B operand K-major (as linear.py does).
            wt_q, wt_s = w_q.transpose(1, 2).contiguous(), w_s.transpose(1, 2)
            dx = grouped_fp8_gemm(dy_q, _gemm_scales(dy_s), wt_q, wt_s, ends, ctx.x_dtype)
        if needs_dw:  # dyᵀ in 128x1 tiles: (N, T)
            dw = grouped_wgrad(dyt_q, _gemm_scales(dyt_s), xt_q, _gemm_scales(xt_s), ends)
        return dx, dw, None


def grouped_fp8_linear(x_padded: torch.Tensor, w: torch.Tensor,
                       ends: torch.Tensor) -> torch.Tensor:
    """Every expert's Linear on its own segment of rows, the three GEMMs in FP8.

    Per expert it is :func:`~dsv3lite.fp8.linear.fp8_linear` (same quantization, same
    results), but each GEMM runs once for all experts.

    Args:
        x_padded: (M, K) high-precision rows in 128-aligned segments with zero padding
            rows (:func:`pad_segments`); the padding must stay zero.
        w: (E, N, K) high-precision (master) weights, expert e's like ``nn.Linear.weight``.
        ends: (E,) segment ends (pad_segments' padded_ends), on x_padded's device.

    Returns:
        (M, N) in the autocast dtype if autocast is on, else x_padded's dtype; rows
        outside every segment's tokens are zero. dW comes back in fp32.
    """
    if not isinstance(x_padded, torch.Tensor) or x_padded.dim() != 2 \
            or not x_padded.is_floating_point():
        raise ValueError(f"x_padded has shape {tuple(getattr(x_padded, 'shape', ()))} and "
                         f"dtype {getattr(x_padded, 'dtype', None)}: must be a 2-D (M, K) "
                         "floating-point tensor")
    if not isinstance(w, torch.Tensor) or w.dim() != 3 or not w.is_floating_point() \
            or w.shape[2] != x_padded.shape[1]:
        raise ValueError(f"w has shape {tuple(getattr(w, 'shape', ()))} and dtype "
                         f"{getattr(w, 'dtype', None)}: must be a floating-point (E, N, K) "
                         f"tensor with K={x_padded.shape[1]} like x_padded")
    _check_ends(ends, w.shape[0], x_padded.device)
    if torch.is_grad_enabled() and (x_padded.requires_grad or w.requires_grad):
        return _GroupedFP8LinearFunction.apply(x_padded, w, ends)
    return _grouped_fprop(*act_quant(x_padded), w, ends, output_dtype(x_padded))[0]


def grouped_fp8_experts(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor,
                        w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """The SwiGLU routed experts w2[e](silu(w1[e] x) * w3[e] x), all GEMMs in grouped FP8.

    Args:
        x: (N, dim) tokens sorted by expert (expert 0's first), as
            :class:`~dsv3lite.moe.GroupedExperts` receives them.
        counts: (E,) tokens per expert, on x's device (never read by the host).
        w1, w3: (E, inter_dim, dim) and w2 (E, dim, inter_dim) master weights.

    Returns:
        (N, dim) outputs in x's order; dtype as :func:`grouped_fp8_linear`.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x has shape {tuple(getattr(x, 'shape', ()))}: must be 2-D "
                         "(N, dim) tokens sorted by expert")
    _check_counts(counts, None, x.device)
    E, dim = counts.numel(), x.shape[1]
    for name, w in (("w1", w1), ("w3", w3)):
        if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.shape[0] != E \
                or w.shape[2] != dim or w.shape != w1.shape:
            raise ValueError(f"{name} has shape {tuple(getattr(w, 'shape', ()))}: must be "
                             f"(E={E}, inter_dim, dim={dim}), w1 and w3 alike")
    inter_dim = w1.shape[1]
    if not isinstance(w2, torch.Tensor) or tuple(w2.shape) != (E, dim, inter_dim):
        raise ValueError(f"w2 has shape {tuple(getattr(w2, 'shape', ()))}: must be "
                         f"(E={E}, dim={dim}, inter_dim={inter_dim})")
    x_padded, ends, index = pad_segments(x, counts)
    h = F.silu(grouped_fp8_linear(x_padded, w1, ends)) * grouped_fp8_linear(x_padded, w3, ends)
    return unpad(grouped_fp8_linear(h, w2, ends), index)
