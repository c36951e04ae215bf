"""FP8 mixed-precision training with fine-grained scaling, DeepSeek-V3 style ([V3] §3.3).

Every tensor that enters a Linear GEMM is stored in E4M3 (max 448, 3 mantissa bits)
with one online scale per small tile: 1x128 for activations and gradients, 128x1 for the
weight gradient, 128x128 for weights. V3 gets the 128x1 tiles by re-quantizing its
stored 1x128 FP8 tiles ([V3] §3.5.2); this package quantizes both tilings from high
precision (:mod:`~dsv3lite.fp8.linear` says what that changes). The GEMMs promote their
partial sums to fp32 every 128-wide K-block, multiplying in the two scales there
([V3] §3.3.2; [V3-code] ``inference/kernel.py``).

Modules, one idea each:

- :mod:`~dsv3lite.fp8.e4m3`: the number format (448, the spacing of its values);
- :mod:`~dsv3lite.fp8.reference`: quantization, dequantization and the block-scaled GEMM
  in plain PyTorch, the reference everything else is tested against;
- :mod:`~dsv3lite.fp8.kernels`: the same operations as Triton kernels (imports Triton);
- :mod:`~dsv3lite.fp8.ops`: the one dispatch (Triton on sm_89+ GPUs, else reference)
  behind the official names ``act_quant``, ``weight_quant``, ``weight_dequant``,
  ``fp8_gemm``;
- :mod:`~dsv3lite.fp8.linear`: :class:`FP8Linear` (Fprop, Dgrad, Wgrad in FP8), the
  class a model layer builds its projections with when ``ModelArgs(fp8=True)``;
- :mod:`~dsv3lite.fp8.backends`: which GEMM an FP8Linear runs on a GPU ("triton", the
  default; "hopper", :mod:`~dsv3lite.fp8.hopper_gemm`'s TMA kernel; "scaled_mm",
  torch's blockwise cuBLASLt GEMM), chosen per layer or with :func:`fp8_backend`;
- :mod:`~dsv3lite.fp8.grouped`: the same three GEMMs for all routed experts of an MoE
  layer at once, built from :mod:`~dsv3lite.fp8.segments` (128-aligned segments of
  tokens), :mod:`~dsv3lite.fp8.grouped_reference` (plain PyTorch, one expert at a time)
  and :mod:`~dsv3lite.fp8.grouped_kernels` (one Triton launch for all experts);
- :mod:`~dsv3lite.fp8.accumulation`: emulations of limited-precision accumulation, to
  measure why the GEMMs promote to fp32 every 128 elements (chapter 5).

This package imports nothing from the model: it is a library beneath it. Converting an
existing model is :func:`dsv3lite.model.convert_to_fp8`, which knows the model's layers.

Usage::

    from dsv3lite.fp8 import act_quant, weight_quant, fp8_gemm
    x_q, x_s = act_quant(x)          # (M, K) -> E4M3 (M, K), scales (M, K/128)
    w_q, w_s = weight_quant(w)       # (N, K) -> E4M3 (N, K), scales (N/128, K/128)
    y = fp8_gemm(x_q, x_s, w_q, w_s, torch.bfloat16)   # ≈ x @ w.T
"""

from .backends import BACKENDS, fp8_backend
from .e4m3 import E4M3_DTYPE, E4M3_MAX, e4m3_spacing
from .grouped import grouped_fp8_experts
from .linear import FP8Linear, fp8_linear, fp8_weight_cache, linear_class
from .ops import act_quant, act_quant_both, fp8_gemm, use_triton, weight_dequant, weight_quant
from .reference import BLOCK_SIZE

__all__ = ["E4M3_DTYPE", "E4M3_MAX", "BLOCK_SIZE", "e4m3_spacing", "act_quant", "weight_quant",
           "weight_dequant", "fp8_gemm", "use_triton", "FP8Linear", "fp8_linear",
           "linear_class", "act_quant_both", "fp8_weight_cache", "grouped_fp8_experts", "BACKENDS",
           "fp8_backend"]
