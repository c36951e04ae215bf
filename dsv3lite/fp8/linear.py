"""FP8 training of Linear layers: Fprop, Dgrad and Wgrad as block-scaled GEMMs ([V3] §3.3).

A Linear y = x W^T costs three GEMMs per training step, and DeepSeek-V3 runs all three
in FP8, promoting the sums to fp32 every 128 elements ([V3] §3.3, Fig. 6):

    Fprop  y  = x  · W^T     x in 1x128 tiles (along K),       W in 128x128 blocks
    Dgrad  dx = dy · W       dy in 1x128 tiles (along N),      W^T in 128x128 blocks
    Wgrad  dW = dy^T · x     dy and x in 128x1 tiles (along the tokens, Wgrad's K)

The weight stays an fp32 master Parameter and is quantized at every forward, or once
per optimizer step inside :func:`fp8_weight_cache` (for W and the Wᵀ blocks Dgrad
reads), which a loop over several micro-batches per step should open; the weight
gradient comes out in fp32. The output dtype is the autocast dtype when autocast is on
(bf16 on GPU, as in the paper), otherwise x's dtype.

**The second tiling: this package's design, not V3's.** Like the paper (§3.3.3), the
forward caches the input for the backward pass only in FP8, but it gets Wgrad's 128x1
tiles another way. V3 stores activations as 1x128 FP8 tiles; its backward pass reads
them out, dequantizes them, transposes them and re-quantizes those FP8 values into 128x1
tiles (§3.5.2). For the inputs of the Linear after attention it uses power-of-2 scales,
so that this conversion adds no quantization error (§3.3.3). Here the forward quantizes
both tilings from the high-precision x in one pass
(:func:`~dsv3lite.fp8.ops.act_quant_both`), runs Fprop on the 1x128 tiles and caches the
128x1 tiles; the backward does the same for the output gradient. What that changes:
every value is rounded once instead of twice, so plain amax/448 scales lose nothing to
re-tiling; and both tilings of x are held in memory together during the forward (one
more FP8 copy of x and its scales, where V3 builds the second tiling in the backward).
What stays cached from the forward to the backward is one FP8 copy of x in both designs.
Chapter 5 (section 3) measures both routes.

This module knows nothing of the model. The model picks its Linear class in one place,
when its modules are built (:func:`linear_class`, from ``ModelArgs.fp8``), and
:func:`dsv3lite.model.convert_to_fp8` converts a model built without FP8; both say
which layers run in FP8 (§3.3.1). Dimensions need not be multiples of 128: partial tiles
are zero-padded inside the quantizers and the GEMM (:mod:`dsv3lite.fp8.reference`).

Which GEMM runs on a GPU is each FP8Linear's ``backend`` ("triton", "hopper",
"scaled_mm"; :mod:`dsv3lite.fp8.backends`), fixed when it is built; on the CPU all
three run the reference.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .backends import DEFAULT_BACKEND, block_scaled_gemm, check_backend, default_backend
from .ops import act_quant, act_quant_both, output_dtype, weight_quant

__all__ = ["FP8Linear", "fp8_linear", "linear_class", "fp8_weight_cache", "quantized_weight"]

_weight_cache: Optional[dict] = None  # id(weight) -> entry, while fp8_weight_cache is open
_hook = None  # the optimizer-step hook that empties the cache, registered on first use


def _forget_weights(*_: object) -> None:
    if _weight_cache is not None:
        _weight_cache.clear()


@contextlib.contextmanager
def fp8_weight_cache() -> Iterator[None]:
    """Quantize each FP8 weight once for everything run inside: one optimizer step.

    With several micro-batches per optimizer step (gradient accumulation, a pipeline
    schedule), the weights do not change between them, so W's 128x128 blocks and the
    transposed blocks Dgrad needs are computed on first use and reused. Open it around
    the micro-batches of one step and close it before ``optimizer.step()``. As guards,
    any ``torch.optim`` step empties the cache (a global step hook), and an entry is
    dropped when its weight's version changes (in-place writes; fused optimizers do not
    bump it, hence the hook). Nesting is allowed (the outermost context owns the cache).
    """
    global _weight_cache, _hook
    if _hook is None:
        _hook = register_optimizer_step_post_hook(_forget_weights)
    owner = _weight_cache is None
    if owner:
        _weight_cache = {}
    try:
        yield
    finally:
        if owner:
            _weight_cache = None


def _cache_entry(weight: torch.Tensor) -> Optional[dict]:
    cache = _weight_cache
    if cache is None or torch.compiler.is_compiling():
        return None
    entry = cache.get(id(weight))
    if entry is None or entry["weight"] is not weight or entry["version"] != weight._version:
        entry = cache[id(weight)] = {"weight": weight, "version": weight._version}
    return entry


def quantized_weight(
        weight: torch.Tensor,
        quantize: Optional[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize(weight)`` (default ``weight_quant``: W's 128x128 blocks), from the cache
    when :func:`fp8_weight_cache` is open and W has not changed since it was quantized.
    The grouped experts pass ``grouped_weight_quant`` for their stacked weights."""
    quantize = quantize or weight_quant
    entry = _cache_entry(weight)
    if entry is None:
        return quantize(weight.detach())
    if "blocks" not in entry:
        entry["blocks"] = quantize(weight.detach())
    return entry["blocks"]


def _transposed_blocks(weight: torch.Tensor, w_q: torch.Tensor,
                       w_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Wᵀ's 128x128 blocks for Dgrad: W's blocks transposed (exact), cached with them."""
    entry = _cache_entry(weight)
    if entry is None or entry.get("blocks", (None,))[0] is not w_q:
        return w_q.t().contiguous(), w_s.t().contiguous()
    if "transposed" not in entry:
        entry["transposed"] = (w_q.t().contiguous(), w_s.t().contiguous())
    return entry["transposed"]


def _fprop(x_q: torch.Tensor, x_s: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor], out_dtype: torch.dtype, backend: str
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fprop: (M, N) output from x's 1x128 tiles and W's 128x128 blocks, plus the
    blocks (Dgrad transposes them)."""
    w_q, w_s = quantized_weight(weight)
    y = block_scaled_gemm(x_q, x_s, w_q, w_s, out_dtype, backend)
    if bias is not None:
        y = y + bias.to(out_dtype)
    return y, w_q, w_s


class _FP8LinearFunction(torch.autograd.Function):
    """y = x W^T (+ b) with the three GEMMs in FP8; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                backend: str) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (M, K) tokens x in_features
        needs_dx, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if needs_dw:  # 1x128 tiles for Fprop and 128x1 tiles for Wgrad, one read of x
            x_q, x_s, xt_q, xt_s = act_quant_both(x2)
        else:
            (x_q, x_s), xt_q, xt_s = act_quant(x2), None, None
        y, w_q, w_s = _fprop(x_q, x_s, weight, bias, output_dtype(x), backend)
        ctx.save_for_backward(xt_q, xt_s, w_q if needs_dx else None, w_s if needs_dx else None)
        ctx.weight = weight if needs_dx else None  # to find Wᵀ's blocks in the cache
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        ctx.backend = backend
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        xt_q, xt_s, w_q, w_s = ctx.saved_tensors
        dy = grad_y.reshape(-1, grad_y.shape[-1])  # (M, N)
        dx = dw = db = None
        needs_dx, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if needs_dx and needs_dw:  # 1x128 tiles along N (Dgrad's K), 128x1 for Wgrad
            dy_q, dy_s, dyt_q, dyt_s = act_quant_both(dy)
        elif needs_dx:
            dy_q, dy_s = act_quant(dy)
        elif needs_dw:
            dyt_q, dyt_s = act_quant(dy, transpose=True)
        if needs_dx:
            wt_q, wt_s = _transposed_blocks(ctx.weight, w_q, w_s)  # Wᵀ: (K, N) blocks
            dx = block_scaled_gemm(dy_q, dy_s, wt_q, wt_s, ctx.x_dtype,
                                   ctx.backend).view(ctx.x_shape)  # Dgrad
        if needs_dw:
            dw = block_scaled_gemm(dyt_q, dyt_s, xt_q, xt_s, torch.float32,
                                   ctx.backend)  # Wgrad (N, K), fp32
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.float().sum(0)
        return dx, dw, db, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               backend: str = DEFAULT_BACKEND) -> torch.Tensor:
    """``F.linear`` with FP8 Fprop, Dgrad and Wgrad.

    Args:
        x: (..., in_features) input.

        weight: (out_features, in_features) high-precision (master) weight.

        bias: Optional (out_features,) bias, added in high precision.

        backend: The GEMM on CUDA: "triton", "hopper" or "scaled_mm"
            (:mod:`dsv3lite.fp8.backends`); the CPU runs the reference for all three.

    Returns:
        (..., out_features) in the autocast dtype if autocast is on, else x's dtype.
    """
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _FP8LinearFunction.apply(x, weight, bias, backend)
    y, _, _ = _fprop(*act_quant(x.reshape(-1, x.shape[-1])), weight, bias, output_dtype(x),
                     backend)
    return y.view(*x.shape[:-1], weight.shape[0])


class FP8Linear(nn.Linear):
    """A drop-in ``nn.Linear`` whose three GEMMs run block-scaled in FP8.

    Same ``weight`` (and ``bias``) Parameters, so state-dict keys, checkpoints, parameter
    counts and optimizers see no difference; only the arithmetic changes.

    Args:
        in_features, out_features, bias, device, dtype: As for ``nn.Linear``.

        backend: The GEMM it runs on CUDA ("triton", "hopper", "scaled_mm"); None takes
            :func:`~dsv3lite.fp8.backends.default_backend`, which ``with
            fp8_backend(...)`` sets for a whole model. Checked here: a bad name raises
            a ValueError now, not at the first forward.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.types.Device = None, dtype: Optional[torch.dtype] = None,
                 backend: Optional[str] = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.backend = check_backend(default_backend() if backend is None else backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T (+ b)`` through :func:`fp8_linear` with this layer's backend.

        Args:
            x: (..., in_features) input.

        Returns:
            (..., out_features) in the autocast dtype if autocast is on, else x's dtype.
        """
        return fp8_linear(x, self.weight, self.bias, self.backend)

    def extra_repr(self) -> str:
        """``nn.Linear``'s description plus the backend, e.g. ``in_features=256,
        out_features=512, bias=False, backend='triton'``."""
        return f"{super().extra_repr()}, backend={self.backend!r}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: Optional[str] = None) -> "FP8Linear":
        """An FP8Linear that shares ``linear``'s Parameter objects (nothing is copied)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear={type(linear).__name__} is invalid: must be an nn.Linear")
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device="meta", backend=backend)
        new.weight = linear.weight
        new.bias = linear.bias
        return new


def linear_class(fp8: bool) -> type[nn.Linear]:
    """The Linear a layer builds its projections with: :class:`FP8Linear` when ``fp8``,
    else ``nn.Linear``. Both construct (and initialise) the same Parameters."""
    return FP8Linear if fp8 else nn.Linear
