"""FP8 training of Linear layers: Fprop, Dgrad and Wgrad as block-scaled GEMMs ([V3] §3.3).

A Linear y = x W^T costs three GEMMs per training step, and DeepSeek-V3 runs all three
in FP8 with fp32 accumulation ([V3] §3.3, Fig. 6):

    Fprop  y  = x  · W^T     x in 1x128 tiles (along K),       W in 128x128 blocks
    Dgrad  dx = dy · W       dy in 1x128 tiles (along N),      W^T in 128x128 blocks
    Wgrad  dW = dy^T · x     dy and x in 128x1 tiles (along the tokens, Wgrad's K)

The weight stays an fp32 master Parameter and is quantized afresh at every forward;
the weight gradient comes out in fp32. The forward caches the input only in FP8, already
re-tiled 128x1 for Wgrad, as the paper caches activations in FP8 (§3.3.3); both tilings
are quantized from the high-precision x, so no value is quantized twice. The output
dtype is the autocast dtype when autocast is on (bf16 on GPU, as in the paper),
otherwise x's dtype.

:func:`convert_to_fp8` swaps the eligible Linears of a model for :class:`FP8Linear`.
Following §3.3.1 it converts the Linear projections of attention (MLA: ``wq``/``wq_a``,
``wq_b``, ``wkv_a``, ``wkv_b``, ``wo``) and of every SwiGLU FFN (dense FFNs, routed and
shared experts: ``w1``, ``w2``, ``w3``). It leaves in higher precision the embedding, the
output head, the router (``Gate``), the norms and the attention core (softmax(QK^T)V),
as the paper does, and also the MTP projection ``eh_proj``: our call, since the paper
does not list it among the FP8 GEMMs and it merges two separately normalised streams.
Dimensions need not be multiples of 128: partial tiles are zero-padded inside the
quantizers and the GEMM (:mod:`dsv3lite.fp8.reference`), so every eligible Linear
converts. The absorbed MLA decode reads ``wkv_b.weight`` directly, in high precision.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..mla import MLA
from ..moe import MLP
from .ops import act_quant, fp8_gemm, weight_quant

__all__ = ["FP8Linear", "fp8_linear", "convert_to_fp8", "is_fp8_eligible"]


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _fprop(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           out_dtype: torch.dtype):
    """Fprop: (M, N) output, plus the quantized weight for Dgrad."""
    w_q, w_s = weight_quant(weight)  # 128x128 blocks
    x_q, x_s = act_quant(x2)  # 1x128 tiles
    y = fp8_gemm(x_q, x_s, w_q, w_s, out_dtype)
    if bias is not None:
        y = y + bias.to(out_dtype)
    return y, w_q, w_s


class _FP8LinearFunction(torch.autograd.Function):
    """y = x W^T (+ b) with the three GEMMs in FP8; see the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (M, K) tokens x in_features
        y, w_q, w_s = _fprop(x2, weight, bias, _output_dtype(x))
        needs_dx, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        xt_q, xt_s = act_quant(x2, transpose=True) if needs_dw else (None, None)  # 128x1
        ctx.save_for_backward(xt_q, xt_s, w_q if needs_dx else None, w_s if needs_dx else None)
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        xt_q, xt_s, w_q, w_s = ctx.saved_tensors
        dy = grad_y.reshape(-1, grad_y.shape[-1])  # (M, N)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dy_q, dy_s = act_quant(dy)  # 1x128 tiles along N, Dgrad's K
            wt_q, wt_s = w_q.t().contiguous(), w_s.t().contiguous()  # W^T: (K, N) blocks
            dx = fp8_gemm(dy_q, dy_s, wt_q, wt_s, ctx.x_dtype).view(ctx.x_shape)  # Dgrad
        if ctx.needs_input_grad[1]:
            dyt_q, dyt_s = act_quant(dy, transpose=True)  # 128x1 tiles: (N, M)
            dw = fp8_gemm(dyt_q, dyt_s, xt_q, xt_s, torch.float32)  # Wgrad (N, K), fp32
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.float().sum(0)
        return dx, dw, db


def fp8_linear(x: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear`` with FP8 Fprop, Dgrad and Wgrad.

    Args:
        x: (..., in_features) input.
        weight: (out_features, in_features) high-precision (master) weight.
        bias: Optional (out_features,) bias, added in high precision.

    Returns:
        (..., out_features) in the autocast dtype if autocast is on, else x's dtype.
    """
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _FP8LinearFunction.apply(x, weight, bias)
    y, _, _ = _fprop(x.reshape(-1, x.shape[-1]), weight, bias, _output_dtype(x))  # inference
    return y.view(*x.shape[:-1], weight.shape[0])


class FP8Linear(nn.Linear):
    """A drop-in ``nn.Linear`` whose three GEMMs run block-scaled in FP8.

    Same ``weight`` (and ``bias``) Parameters, so state-dict keys, checkpoints, parameter
    counts and optimizers see no difference; only the arithmetic changes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        """An FP8Linear that shares ``linear``'s Parameter objects (nothing is copied)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear={type(linear).__name__} is invalid: must be an nn.Linear")
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        return new


def is_fp8_eligible(owner: nn.Module, linear: nn.Module) -> bool:
    """Whether ``linear``, a direct child of ``owner``, runs in FP8 (§3.3.1).

    True for plain ``nn.Linear`` children of MLA (attention projections) and of MLP
    (dense FFNs, routed and shared experts). Everything else stays in high precision:
    the embedding, output head, router, norms, attention core and MTP ``eh_proj``.
    """
    return isinstance(owner, (MLA, MLP)) and type(linear) is nn.Linear


def convert_to_fp8(model: nn.Module) -> list[str]:
    """Swap the eligible Linears of ``model`` for :class:`FP8Linear`, in place.

    Args:
        model: A :class:`~dsv3lite.Transformer` or any module containing MLA / MLP.

    Returns:
        Qualified names of the Linears converted by this call (already converted
        ones are left alone, so calling twice converts nothing more).
    """
    converted = []
    for owner_name, owner in list(model.named_modules()):
        for child_name, child in list(owner.named_children()):
            if is_fp8_eligible(owner, child):
                setattr(owner, child_name, FP8Linear.from_linear(child))
                converted.append(f"{owner_name}.{child_name}" if owner_name else child_name)
    return converted
