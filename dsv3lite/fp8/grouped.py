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

The parts, one module each:

- :mod:`dsv3lite.fp8.segments`: the tokens in 128-aligned segments, which make every
  quantization tile that of one expert alone, with no host synchronisation;
- :mod:`dsv3lite.fp8.grouped_reference`: the grouped GEMMs in plain PyTorch, one
  expert at a time;
- :mod:`dsv3lite.fp8.grouped_kernels`: the same as Triton kernels, one launch each.

This module puts them together: one dispatch per GEMM (the kernels on a CUDA tensor for
which :func:`~dsv3lite.fp8.ops.use_triton` holds, the references elsewhere), all
experts' weights quantized in one call, the autograd function that runs Fprop, Dgrad
and Wgrad grouped, and the SwiGLU experts' layer :func:`grouped_fp8_experts`. The
public names of the three parts are importable from here too.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from .grouped_kernels import grouped_fp8_gemm_triton, grouped_wgrad_triton
from .grouped_reference import (check_grouped_gemm, check_grouped_wgrad,
                                grouped_fp8_gemm_ref, grouped_wgrad_ref)
from .linear import quantized_weight
from .ops import act_quant, act_quant_both, output_dtype, use_triton, weight_quant
from .reference import BLOCK_SIZE, ceil_div
from .segments import ALIGN, check_counts, check_ends, k_major, pad_segments, padded_rows, unpad

__all__ = ["ALIGN", "padded_rows", "pad_segments", "unpad", "k_major", "grouped_weight_quant",
           "grouped_fp8_gemm_ref", "grouped_wgrad_ref", "grouped_fp8_gemm_triton",
           "grouped_wgrad_triton", "grouped_fp8_gemm", "grouped_wgrad", "grouped_fp8_linear",
           "grouped_fp8_experts"]

_force_triton = False
"""Tests set this in an interpreted child process to send CPU tensors to the kernels
(on this module: the dispatch below reads it here)."""


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


# ----------------------------------------------------------------- dispatch
def _triton_path(t: torch.Tensor) -> bool:
    return _force_triton or use_triton(t)


def grouped_fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                     ends: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Grouped block-scaled FP8 GEMM: Triton on sm_89+ GPUs, the reference elsewhere.

    Under ``torch.compile`` it is one opaque custom op, ``torch.ops.dsv3lite.grouped_fp8_gemm``,
    as the operations of :mod:`dsv3lite.fp8.ops` are: the graph never sees the Triton
    launch, nor the reference's host read of ``ends``, which happens when the graph runs.

    Args:
        a, a_s, b, b_s, ends, out_dtype: As in
            :func:`~dsv3lite.fp8.grouped_reference.grouped_fp8_gemm_ref`. On the Triton
            path ``ends`` are not checked (that would need a host sync), and K-major
            ``a_s`` (:func:`~dsv3lite.fp8.segments.k_major`) loads fastest.

    Returns:
        (M, N) in ``out_dtype`` (default ``torch.get_default_dtype()``).
    """
    out_dtype = out_dtype or torch.get_default_dtype()
    if torch.compiler.is_compiling():
        return torch.ops.dsv3lite.grouped_fp8_gemm(a, a_s, b, b_s, ends, out_dtype)
    return _grouped_fp8_gemm(a, a_s, b, b_s, ends, out_dtype)


def grouped_wgrad(dy_t: torch.Tensor, dy_t_s: torch.Tensor, x_t: torch.Tensor,
                  x_t_s: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Grouped FP8 weight gradient: Triton on sm_89+ GPUs, the reference elsewhere
    (one custom op under ``torch.compile``, like :func:`grouped_fp8_gemm`).

    Args:
        dy_t, dy_t_s, x_t, x_t_s, ends: As in
            :func:`~dsv3lite.fp8.grouped_reference.grouped_wgrad_ref` (``ends`` not
            checked on the Triton path).

    Returns:
        (E, N, K) fp32.
    """
    if torch.compiler.is_compiling():
        return torch.ops.dsv3lite.grouped_wgrad(dy_t, dy_t_s, x_t, x_t_s, ends)
    return _grouped_wgrad(dy_t, dy_t_s, x_t, x_t_s, ends)


def _grouped_fp8_gemm(a, a_s, b, b_s, ends, out_dtype):
    if _triton_path(a):
        return grouped_fp8_gemm_triton(a, a_s, b, b_s, ends, out_dtype)
    return grouped_fp8_gemm_ref(a, a_s, b, b_s, ends, out_dtype)


def _grouped_wgrad(dy_t, dy_t_s, x_t, x_t_s, ends):
    if _triton_path(dy_t):
        return grouped_wgrad_triton(dy_t, dy_t_s, x_t, x_t_s, ends)
    return grouped_wgrad_ref(dy_t, dy_t_s, x_t, x_t_s, ends)


def _fake_grouped_fp8_gemm(a, a_s, b, b_s, ends, out_dtype):
    check_grouped_gemm(a, a_s, b, b_s, ends)
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)  # both paths: contiguous


def _fake_grouped_wgrad(dy_t, dy_t_s, x_t, x_t_s, ends):
    check_grouped_wgrad(dy_t, dy_t_s, x_t, x_t_s, ends)
    return dy_t.new_empty((ends.numel(), dy_t.shape[0], x_t.shape[0]), dtype=torch.float32)


torch.library.custom_op(
    "dsv3lite::grouped_fp8_gemm", _grouped_fp8_gemm, mutates_args=(),
    schema="(Tensor a, Tensor a_s, Tensor b, Tensor b_s, Tensor ends, ScalarType out_dtype) "
           "-> Tensor").register_fake(_fake_grouped_fp8_gemm)
torch.library.custom_op(
    "dsv3lite::grouped_wgrad", _grouped_wgrad, mutates_args=(),
    schema="(Tensor dy_t, Tensor dy_t_s, Tensor x_t, Tensor x_t_s, Tensor ends) -> Tensor"
).register_fake(_fake_grouped_wgrad)


def _gemm_scales(s: torch.Tensor) -> torch.Tensor:
    """K-major scales for the Triton kernels; the reference takes them as they are."""
    return k_major(s) if _triton_path(s) else s


# ----------------------------------------------------------------- autograd
def _quantized_experts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grouped_weight_quant(weight), once per optimizer step inside
    :func:`~dsv3lite.fp8.linear.fp8_weight_cache`."""
    return quantized_weight(weight, grouped_weight_quant)


def _grouped_fprop(x_q: torch.Tensor, x_s: torch.Tensor, weight: torch.Tensor,
                   ends: torch.Tensor, out_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fprop for all experts from x's 1x128 tiles: (M, N) output, plus the quantized
    weights for Dgrad."""
    w_q, w_s = _quantized_experts(weight)  # 128x128 blocks, every expert at once
    return grouped_fp8_gemm(x_q, _gemm_scales(x_s), w_q, w_s, ends, out_dtype), w_q, w_s


class _GroupedFP8LinearFunction(torch.autograd.Function):
    """y[e-rows] = x[e-rows] W[e]^T with Fprop, Dgrad and Wgrad as grouped FP8 GEMMs."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor,
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
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
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
            rows (:func:`~dsv3lite.fp8.segments.pad_segments`); the padding must stay zero.

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
    check_ends(ends, w.shape[0], x_padded.device)
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
    check_counts(counts, None, x.device)
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
