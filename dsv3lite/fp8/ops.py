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

**One graph under** ``torch.compile``. Inside a compiled region each operation is one
``torch.library`` custom op (``torch.ops.dsv3lite.act_quant``, ...): the compiler sees an
opaque call with a known output (shape, dtype and strides, both paths' layouts), never
the Triton launch, its lazy import or the reference's Python, so ``fullgraph=True``
holds. The op's body is the eager dispatch above, run when the graph runs. Outside a
compiled region the functions call the dispatch directly (no custom-op overhead). The
choice of path is a constant while tracing: whether Triton is installed is decided once
at import, and a GPU's compute capability is read once per device, outside the graph
(:func:`use_triton`).
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Callable, Optional

import torch

from . import reference
from .e4m3 import E4M3_DTYPE
from .reference import BLOCK_SIZE, ceil_div

__all__ = ["use_triton", "act_quant", "act_quant_both", "weight_quant", "weight_dequant",
           "fp8_gemm"]

MIN_CAPABILITY = (8, 9)
"""FP8 tensor cores arrived with Ada (sm_89) and Hopper (sm_90)."""
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
"""Decided once, at import: a module search while tracing would break the graph."""
_force_triton = False
"""Tests set this in an interpreted child process (``TRITON_INTERPRET=1``) to send CPU
tensors to the kernels, compiled graphs included."""
_refusals: dict[int, str] = {}  # CUDA device index -> why the kernels cannot run ("" = they can)


@torch.compiler.assume_constant_result
def kernels_refused(device_index: int) -> str:
    """Why the Triton kernels cannot run on CUDA device ``device_index`` ("" if they can).

    Computed once per device, with a one-time RuntimeWarning when they cannot. Marked
    ``assume_constant_result``: ``torch.compile`` calls it as plain Python while tracing
    and keeps the answer as a constant, so the capability query and the warning never
    enter a graph.
    """
    if device_index not in _refusals:
        if torch.version.hip is not None:
            reason = "ROCm GPUs use another FP8 format (e4m3fnuz) than these kernels"
        elif torch.cuda.get_device_capability(device_index) < MIN_CAPABILITY:
            reason = (f"{torch.cuda.get_device_name(device_index)} has compute capability "
                      f"{torch.cuda.get_device_capability(device_index)}, FP8 tensor cores "
                      f"need {MIN_CAPABILITY} or newer")
        elif not TRITON_INSTALLED:
            reason = "Triton is not installed"
        else:
            reason = ""
        _refusals[device_index] = reason
        if reason:
            warnings.warn(f"dsv3lite.fp8: {reason}; using the plain-PyTorch reference path "
                          "(correct, but slower)", RuntimeWarning, stacklevel=2)
    return _refusals[device_index]


def use_triton(t: torch.Tensor) -> bool:
    """Whether the FP8 operations on tensors like ``t`` run as compiled Triton kernels.

    Traceable: under ``torch.compile`` the answer is a constant of the graph.

    Args:
        t: Any tensor of the operation.

    Returns:
        True for CUDA tensors on an sm_89+ GPU with Triton installed; False otherwise
        (a one-time warning explains why when a CUDA tensor is refused).
    """
    if not t.is_cuda:
        return False
    index = t.device.index
    return not kernels_refused(torch.cuda.current_device() if index is None else index)


def _triton_path(t: torch.Tensor) -> bool:
    return _force_triton or use_triton(t)


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
    if torch.compiler.is_compiling():  # one opaque node (module docstring)
        return torch.ops.dsv3lite.act_quant(x, scale_fmt, transpose)
    return _act_quant(x, scale_fmt, transpose)


def act_quant_both(x: torch.Tensor, scale_fmt: Optional[str] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both tilings of x at once: ``act_quant(x)`` and ``act_quant(x, transpose=True)``.

    A training step needs both for the input of every FP8 Linear (Fprop and Wgrad) and
    for every output gradient (Dgrad and Wgrad). The Triton kernel reads x once for both;
    the reference simply makes the two calls. Same values either way.

    Returns:
        ``(q, s, qt, st)`` as the two calls return them.
    """
    if torch.compiler.is_compiling():
        return torch.ops.dsv3lite.act_quant_both(x, scale_fmt)
    return _act_quant_both(x, scale_fmt)


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
    if torch.compiler.is_compiling():
        return torch.ops.dsv3lite.weight_quant(w, scale_fmt)
    return _weight_quant(w, scale_fmt)


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
    out_dtype = out_dtype or torch.get_default_dtype()
    if torch.compiler.is_compiling():
        return torch.ops.dsv3lite.weight_dequant(q, s, out_dtype)
    return _weight_dequant(q, s, out_dtype)


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
    out_dtype = out_dtype or torch.get_default_dtype()
    if torch.compiler.is_compiling():
        return torch.ops.dsv3lite.fp8_gemm(a, a_s, b, b_s, out_dtype)
    return _fp8_gemm(a, a_s, b, b_s, out_dtype)


# ------------------------------------------------------- the eager dispatch
def _act_quant(x, scale_fmt, transpose):
    if _triton_path(x):
        # optional dependency: Triton, loaded on first use (never while tracing)
        from .kernels import act_quant_triton
        return act_quant_triton(x, scale_fmt, transpose)
    return reference.act_quant_ref(x, scale_fmt, transpose)


def _act_quant_both(x, scale_fmt):
    if _triton_path(x):
        # optional dependency: Triton, loaded on first use (never while tracing)
        from .kernels import act_quant_both_triton
        return act_quant_both_triton(x, scale_fmt)
    return (*reference.act_quant_ref(x, scale_fmt), *reference.act_quant_ref(x, scale_fmt, True))


def _weight_quant(w, scale_fmt):
    if _triton_path(w):
        # optional dependency: Triton, loaded on first use (never while tracing)
        from .kernels import weight_quant_triton
        return weight_quant_triton(w, scale_fmt)
    return reference.weight_quant_ref(w, scale_fmt)


def _weight_dequant(q, s, out_dtype):
    if _triton_path(q):
        # optional dependency: Triton, loaded on first use (never while tracing)
        from .kernels import weight_dequant_triton
        return weight_dequant_triton(q, s, out_dtype)
    return reference.weight_dequant_ref(q, s, out_dtype)


def _fp8_gemm(a, a_s, b, b_s, out_dtype):
    if _triton_path(a):
        # optional dependency: Triton, loaded on first use (never while tracing)
        from .kernels import fp8_gemm_triton
        return fp8_gemm_triton(a, a_s, b, b_s, out_dtype)
    return reference.fp8_gemm_ref(a, a_s, b, b_s, out_dtype)


# ------------------------------------------- the same, as custom ops for torch.compile
# Each fake returns empty tensors laid out as the path the real call will take returns
# them: the Triton quantizers write scales K-major (a transposed view of a contiguous
# (ceil(K/128), M) tensor), the reference writes everything contiguous. The compiler
# relies on those strides; tests/test_compile.py checks each fake against the real
# call on both paths (torch.library.opcheck).
def _scales(rows: int, n_tiles: int, like: torch.Tensor, k_major: bool) -> torch.Tensor:
    """Empty (rows, n_tiles) fp32 scales, K-major or row-major."""
    if k_major:
        return like.new_empty((n_tiles, rows), dtype=torch.float32).t()
    return like.new_empty((rows, n_tiles), dtype=torch.float32)


def _fake_act_quant(x, scale_fmt, transpose):
    reference.check_quantizable("x", x)
    reference.check_scale_fmt(scale_fmt)
    K, M = x.shape[-1], x.shape[:-1].numel()  # (M, K) tokens x channels
    k_major = _triton_path(x)
    if transpose:
        q = x.new_empty((K, M), dtype=E4M3_DTYPE)
        return q, _scales(K, ceil_div(M, BLOCK_SIZE), x, k_major)
    q = x.new_empty(x.shape, dtype=E4M3_DTYPE)
    return q, _scales(M, ceil_div(K, BLOCK_SIZE), x, k_major).view(*x.shape[:-1], -1)


def _fake_act_quant_both(x, scale_fmt):
    q, s = _fake_act_quant(x, scale_fmt, False)
    return (q, s, *_fake_act_quant(x, scale_fmt, True))


def _fake_weight_quant(w, scale_fmt):
    reference.check_quantizable("w", w, ndim=2)
    reference.check_scale_fmt(scale_fmt)
    N, K = w.shape
    return (w.new_empty((N, K), dtype=E4M3_DTYPE),
            w.new_empty((ceil_div(N, BLOCK_SIZE), ceil_div(K, BLOCK_SIZE)), dtype=torch.float32))


def _fake_weight_dequant(q, s, out_dtype):
    return q.new_empty(q.shape, dtype=out_dtype)


def _fake_fp8_gemm(a, a_s, b, b_s, out_dtype):
    reference.check_gemm_operands(a, a_s, b, b_s)
    return a.new_empty((*a.shape[:-1], b.shape[0]), dtype=out_dtype)


# (name, schema, real function, fake for tracing); typed so that mypy sees callables
_CUSTOM_OPS: list[tuple[str, str, Callable[..., object], Callable[..., object]]] = [
        ("act_quant", "(Tensor x, str? scale_fmt, bool transpose) -> (Tensor, Tensor)",
         _act_quant, _fake_act_quant),
        ("act_quant_both", "(Tensor x, str? scale_fmt) -> (Tensor, Tensor, Tensor, Tensor)",
         _act_quant_both, _fake_act_quant_both),
        ("weight_quant", "(Tensor w, str? scale_fmt) -> (Tensor, Tensor)",
         _weight_quant, _fake_weight_quant),
        ("weight_dequant", "(Tensor q, Tensor s, ScalarType out_dtype) -> Tensor",
         _weight_dequant, _fake_weight_dequant),
        ("fp8_gemm", "(Tensor a, Tensor a_s, Tensor b, Tensor b_s, ScalarType out_dtype) "
         "-> Tensor", _fp8_gemm, _fake_fp8_gemm)]
for _name, _schema, _real, _fake in _CUSTOM_OPS:
    torch.library.custom_op(f"dsv3lite::{_name}", _real, mutates_args=(),
                            schema=_schema).register_fake(_fake)
