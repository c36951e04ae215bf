"""One dispatch for the FP8 operations: compiled Triton on FP8 GPUs, the reference elsewhere.

The public names follow the official ``inference/kernel.py`` ([V3-code]):
:func:`act_quant`, :func:`weight_quant`, :func:`weight_dequant`, :func:`fp8_gemm`. Each
looks at where its input lives:

- a CUDA tensor on a GPU with FP8 tensor cores (compute capability 8.9 or newer: Ada,
  Hopper, Blackwell) and Triton installed: the Triton kernels of
  :mod:`dsv3lite.fp8.kernels`;
- any other tensor (CPU, older GPUs, no Triton): the plain-PyTorch reference of
  :mod:`dsv3lite.fp8.reference`, with the same results. A GPU that cannot run the
  kernels says so once, with a warning.

Both paths share one contract, zero padding of partial tiles included, and the tests
check that they agree. The Triton interpreter is reached through
:mod:`dsv3lite.fp8.kernels` directly (see ``tests/test_fp8_kernels.py``), never here.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Optional

import torch

from . import reference
from .reference import BLOCK_SIZE

__all__ = ["use_triton", "act_quant", "act_quant_both", "weight_quant", "weight_dequant",
           "fp8_gemm"]

MIN_CAPABILITY = (8, 9)
"""FP8 tensor cores arrived with Ada (sm_89) and Hopper (sm_90)."""
_notices_given: set[str] = set()


def _notice_once(reason: str) -> None:
    if reason not in _notices_given:
        _notices_given.add(reason)
        warnings.warn(f"dsv3lite.fp8: {reason}; using the plain-PyTorch reference path "
                      "(correct, but slower)", RuntimeWarning, stacklevel=3)


def use_triton(t: torch.Tensor) -> bool:
    """Whether the FP8 operations on tensors like ``t`` run as compiled Triton kernels.

    Args:
        t: Any tensor of the operation.

    Returns:
        True for CUDA tensors on an sm_89+ GPU with Triton installed; False otherwise
        (a one-time warning explains why when a CUDA tensor is refused).
    """
    if not t.is_cuda:
        return False
    if torch.version.hip is not None:
        _notice_once("ROCm GPUs use another FP8 format (e4m3fnuz) than these kernels")
        return False
    capability = torch.cuda.get_device_capability(t.device)
    if capability < MIN_CAPABILITY:
        _notice_once(f"{torch.cuda.get_device_name(t.device)} has compute capability "
                     f"{capability}, FP8 tensor cores need {MIN_CAPABILITY} or newer")
        return False
    if importlib.util.find_spec("triton") is None:
        _notice_once("Triton is not installed")
        return False
    return True


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an FP8 layer returns for input ``x``: the autocast dtype when autocast is
    on for x's device (bf16 on GPU, as in the paper), otherwise x's own dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _check_block_size(block_size: int) -> None:
    if block_size != BLOCK_SIZE:
        raise ValueError(f"block_size={block_size} is invalid: the kernels and scale "
                         f"layouts use the paper's {BLOCK_SIZE} only")


def act_quant(x: torch.Tensor, block_size: int = BLOCK_SIZE, scale_fmt: Optional[str] = None,
              *, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations (or output gradients) in 1x128 tiles, or 128x1 for Wgrad.

    Args:
        x: (..., K) tensor; the leading dims are tokens.
        block_size: Tile length; only 128 is supported.
        scale_fmt: ``None`` (s = amax / 448) or ``"ue8m0"`` (power-of-2 scales).
        transpose: False: 1x128 tiles, returns q (..., K) and s (..., ceil(K/128)).
            True: 128x1 tiles of the (M, K) token matrix, returned transposed and
            K-major for the weight-gradient GEMM: q (K, M) and s (K, ceil(M/128)).

    Returns:
        ``(q, s)``: E4M3 values and fp32 scales, with x ≈ q · s per tile.
    """
    _check_block_size(block_size)
    if use_triton(x):
        # optional dependency: Triton, loaded on first use
        from .kernels import act_quant_triton
        return act_quant_triton(x, scale_fmt, transpose)
    return reference.act_quant_ref(x, scale_fmt, transpose)


def act_quant_both(x: torch.Tensor, scale_fmt: Optional[str] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both tilings of x at once: ``act_quant(x)`` and ``act_quant(x, transpose=True)``.

    A training step needs both for the input of every FP8 Linear (Fprop and Wgrad) and
    for every output gradient (Dgrad and Wgrad). The Triton kernel reads x once for both;
    the reference simply makes the two calls. Same values either way.

    Returns:
        ``(q, s, qt, st)`` as the two calls return them.
    """
    if use_triton(x):
        # optional dependency: Triton, loaded on first use
        from .kernels import act_quant_both_triton
        return act_quant_both_triton(x, scale_fmt)
    return (*reference.act_quant_ref(x, scale_fmt), *reference.act_quant_ref(x, scale_fmt, True))


def weight_quant(w: torch.Tensor, block_size: int = BLOCK_SIZE,
                 scale_fmt: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight in 128x128 blocks.

    Args:
        w: (N, K) weight laid out like ``nn.Linear.weight``.
        block_size: Block side; only 128 is supported.
        scale_fmt: ``None`` or ``"ue8m0"``.

    Returns:
        ``(q, s)``: q (N, K) E4M3 and s (ceil(N/128), ceil(K/128)) fp32.
    """
    _check_block_size(block_size)
    if use_triton(w):
        # optional dependency: Triton, loaded on first use
        from .kernels import weight_quant_triton
        return weight_quant_triton(w, scale_fmt)
    return reference.weight_quant_ref(w, scale_fmt)


def weight_dequant(q: torch.Tensor, s: torch.Tensor, block_size: int = BLOCK_SIZE,
                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dequantize a 128x128-block E4M3 weight.

    Args:
        q: (N, K) E4M3 weight.
        s: (ceil(N/128), ceil(K/128)) fp32 scales.
        block_size: Block side; only 128 is supported.
        out_dtype: Result dtype (default ``torch.get_default_dtype()``, as officially).

    Returns:
        (N, K) tensor q · s.
    """
    _check_block_size(block_size)
    if use_triton(q):
        # optional dependency: Triton, loaded on first use
        from .kernels import weight_dequant_triton
        return weight_dequant_triton(q, s, out_dtype)
    return reference.weight_dequant_ref(q, s, out_dtype)


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Block-scaled FP8 GEMM c = a @ b^T, accumulated in fp32 per 128-wide K-block.

    Args:
        a: (..., K) E4M3, with a_s (..., ceil(K/128)) scales of its 1x128 tiles.
        b: (N, K) E4M3 laid out like ``nn.Linear.weight``, with b_s either
            (ceil(N/128), ceil(K/128)) for 128x128 blocks or (N, ceil(K/128)) for 1x128
            tiles (the weight gradient's re-tiled activations).
        out_dtype: Result dtype (default ``torch.get_default_dtype()``); bf16 as in the
            paper, or fp32 for weight gradients.

    Returns:
        (..., N) tensor.
    """
    if use_triton(a):
        # optional dependency: Triton, loaded on first use
        from .kernels import fp8_gemm_triton
        return fp8_gemm_triton(a, a_s, b, b_s, out_dtype)
    return reference.fp8_gemm_ref(a, a_s, b, b_s, out_dtype)
