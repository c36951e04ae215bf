"""Which block-scaled GEMM an FP8 Linear runs on a GPU: one name, three backends.

The three GEMMs of :class:`~dsv3lite.fp8.linear.FP8Linear` (Fprop, Dgrad, Wgrad) have
one contract, :func:`~dsv3lite.fp8.reference.fp8_gemm_ref` ([V3] §3.3.2), and three
implementations on CUDA:

- ``"triton"`` (the default): :func:`~dsv3lite.fp8.ops.fp8_gemm`, the readable Triton
  kernel that chapter 5 shows, on any sm_89+ GPU;
- ``"hopper"``: :func:`~dsv3lite.fp8.hopper_gemm.fp8_gemm_hopper`, TMA and a persistent
  grid, sm_90+;
- ``"scaled_mm"``: torch's blockwise ``torch.nn.functional.scaled_mm`` (cuBLASLt,
  ``ScalingType.BlockWise1x128`` / ``BlockWise128x128``), sm_90+ and a torch that has it.

"triton" stays the default because it is the only one measured to be correct on a GPU
so far; the other two have not run on one in this project yet, so neither their speed
nor their agreement on every device is known (``benchmarks/fp8.py``, goal K1).

**Choosing.** ``FP8Linear(..., backend="hopper")``, or build a model inside
``with fp8_backend("hopper"):``, which sets the default for every FP8Linear built
there (a model picks its GEMMs when it is built). A name outside :data:`BACKENDS`, or
``"scaled_mm"`` on a torch without blockwise ``scaled_mm``, raises a ValueError at that
moment, not at the first forward.

**Where they run.** On the CPU every backend runs the reference (the same values), so a
model built for a GPU backend trains and tests anywhere. On CUDA, ``"hopper"`` and
``"scaled_mm"`` refuse a GPU older than sm_90 with a ValueError; a shape their fast
path cannot take (TMA alignment; scaled_mm's whole 128-tiles) is computed by the
Triton kernel instead, with the same result. Both are ``torch.library`` custom ops, so
``torch.compile(fullgraph=True)`` sees one opaque call, and nothing in this dispatch
imports or probes anything while tracing.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from .ops import fp8_gemm
from .reference import (BLOCK_SIZE, ceil_div, check_gemm_operands, fp8_gemm_ref,
                        quantize_tiles)

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "check_backend", "default_backend", "fp8_backend",
           "block_scaled_gemm", "has_blockwise_scaled_mm"]

#: The names of the block-scaled GEMM backends: ``"triton"`` (sm_89+, the default),
#: ``"hopper"`` (TMA, sm_90+) and ``"scaled_mm"`` (cuBLASLt blockwise, sm_90+).
BACKENDS = ("triton", "hopper", "scaled_mm")
DEFAULT_BACKEND = "triton"
"""The default: the Triton kernel measured correct on a GPU; the others are unmeasured."""
HOPPER = (9, 0)
"""TMA, wgmma and cuBLASLt's blockwise FP8 GEMM need Hopper (sm_90) or newer."""
_default = DEFAULT_BACKEND


def has_blockwise_scaled_mm() -> bool:
    """Whether this torch has ``F.scaled_mm`` with the blockwise scaling types (2.10+)."""
    scaling = getattr(F, "ScalingType", None)
    return (hasattr(F, "scaled_mm") and hasattr(scaling, "BlockWise1x128")
            and hasattr(scaling, "BlockWise128x128"))


def check_backend(backend: str) -> str:
    """``backend`` if it is a usable name, else a ValueError naming it and the choices."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: must be one of {BACKENDS}")
    if backend == "scaled_mm" and not has_blockwise_scaled_mm():
        raise ValueError(f"backend='scaled_mm' is unavailable: torch {torch.__version__} has "
                         "no blockwise torch.nn.functional.scaled_mm (ScalingType."
                         "BlockWise1x128, needs torch >= 2.10); use 'triton' or 'hopper'")
    return backend


def default_backend() -> str:
    """The backend an FP8Linear built now gets when it is given none."""
    return _default


@contextlib.contextmanager
def fp8_backend(backend: str) -> Iterator[None]:
    """Make ``backend`` the default of every FP8Linear built inside (e.g. a whole model).

    Example::

        with fp8_backend("hopper"):
            model = Transformer(ModelArgs.h100_1b(fp8=True))
    """
    global _default
    previous, _default = _default, check_backend(backend)
    try:
        yield
    finally:
        _default = previous


def block_scaled_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                      out_dtype: torch.dtype, backend: str = DEFAULT_BACKEND) -> torch.Tensor:
    """``fp8_gemm(a, a_s, b, b_s, out_dtype)`` by ``backend`` (see the module docstring).

    CPU tensors always take the reference, whatever the backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: must be one of {BACKENDS}")
    if backend == "triton" or not a.is_cuda:
        return fp8_gemm(a, a_s, b, b_s, out_dtype)
    if backend == "hopper":
        return torch.ops.dsv3lite.fp8_gemm_hopper(a, a_s, b, b_s, out_dtype)
    return torch.ops.dsv3lite.fp8_gemm_scaled_mm(a, a_s, b, b_s, out_dtype)


def _require_hopper(a: torch.Tensor, backend: str) -> None:
    capability = torch.cuda.get_device_capability(a.device)
    if capability < HOPPER:
        raise ValueError(f"backend={backend!r} needs an sm_90+ GPU (TMA, wgmma); "
                         f"{torch.cuda.get_device_name(a.device)} is sm_{capability[0]}"
                         f"{capability[1]}: use backend='triton'")


def _output_like(a, a_s, b, b_s, out_dtype):
    return a.new_empty((*a.shape[:-1], b.shape[0]), dtype=out_dtype)


@torch.library.custom_op("dsv3lite::fp8_gemm_hopper", mutates_args=())
def _fp8_gemm_hopper_op(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor,
                        b_s: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    _require_hopper(a, "hopper")
    # optional dependency: Triton, loaded on first use (outside any traced graph)
    from .hopper_gemm import fp8_gemm_hopper
    return fp8_gemm_hopper(a, a_s, b, b_s, out_dtype)


_fp8_gemm_hopper_op.register_fake(_output_like)


# ------------------------------------------------------------- torch's scaled_mm
_scale_b_layouts: dict = {}  # (device, b tiles) -> the layout verified on that device


def _scale_b_candidates(b_s: torch.Tensor, b_tiles: int) -> dict:
    """b's scales in the layouts cuBLASLt's blockwise GEMM may want for mat_b = b^T.

    128x128 blocks: [ceil4(K/128), N/128] column-major, K/128 zero-padded to a multiple
    of 4 (``benchmarks/fp8.py`` found this; earlier torch releases were silently wrong
    otherwise). 1x128 tiles: like a's, (N, K/128) with stride (1, N). The others are
    kept as fallbacks for other torch releases; each is verified before it is used.
    """
    nk = b_s.shape[1]
    padded = b_s.new_zeros(b_s.shape[0], ceil_div(nk, 4) * 4)
    padded[:, :nk] = b_s
    if b_tiles == BLOCK_SIZE:
        return {"padded-to-4": padded.t(), "column-major": b_s.t(),
                "row-major": b_s.t().contiguous()}
    return {"column-major": b_s.t().contiguous().t(), "padded-to-4": padded.t(),
            "row-major": b_s.t().contiguous()}


def _scaled_mm(a2, a_s2, b, scale_b, b_tiles, out_dtype):
    recipe_b = (F.ScalingType.BlockWise128x128 if b_tiles == BLOCK_SIZE
                else F.ScalingType.BlockWise1x128)
    return F.scaled_mm(a2, b.t(), a_s2.t().contiguous().t(), F.ScalingType.BlockWise1x128,
                       scale_b, recipe_b, output_dtype=out_dtype)


def _verified_layout(device: torch.device, b_tiles: int, out_dtype: torch.dtype) -> str:
    """Find, once per device and tiling, the scale layout whose result is the
    reference's (within bf16 rounding) on a random 256 x 256 x 640 problem."""
    key = (str(device), b_tiles, out_dtype)
    if key not in _scale_b_layouts:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(256, 640, device=device, generator=g)
        w = torch.randn(256, 640, device=device, generator=g)
        a_q, a_s = quantize_tiles(x, (1, BLOCK_SIZE))
        b_q, b_s = quantize_tiles(w, (b_tiles, BLOCK_SIZE))
        want = fp8_gemm_ref(a_q, a_s, b_q, b_s, torch.float64)
        reasons = []
        for layout, scale_b in _scale_b_candidates(b_s, b_tiles).items():
            try:
                got = _scaled_mm(a_q, a_s, b_q, scale_b, b_tiles, out_dtype)
            except RuntimeError as err:
                reasons.append(f"{layout}: {str(err).splitlines()[0][:120]}")
                continue
            error = float((got.double() - want).norm() / want.norm())
            if error <= 4e-3:
                _scale_b_layouts[key] = layout
                break
            reasons.append(f"{layout}: relative error {error:.3g}")
        else:
            raise RuntimeError(f"backend='scaled_mm': torch {torch.__version__}'s blockwise "
                               f"scaled_mm agreed with the reference in no scale layout "
                               f"({'; '.join(reasons)}); use backend='triton'")
    return _scale_b_layouts[key]


@torch.library.custom_op("dsv3lite::fp8_gemm_scaled_mm", mutates_args=())
def _fp8_gemm_scaled_mm_op(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor,
                           b_s: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    _require_hopper(a, "scaled_mm")
    b_tiles = check_gemm_operands(a, a_s, b, b_s)
    (N, K), nk = b.shape, a_s.shape[-1]
    a2, a_s2 = a.reshape(-1, K), a_s.reshape(-1, nk)
    whole_tiles = K % BLOCK_SIZE == 0 and (b_tiles == 1 or N % BLOCK_SIZE == 0)
    if not whole_tiles or a2.shape[0] == 0 or N == 0:  # cuBLASLt takes whole tiles only
        return fp8_gemm(a, a_s, b, b_s, out_dtype)
    layout = _verified_layout(a.device, b_tiles, out_dtype)
    scale_b = _scale_b_candidates(b_s, b_tiles)[layout]
    return _scaled_mm(a2, a_s2, b, scale_b, b_tiles, out_dtype).view(*a.shape[:-1], N)


_fp8_gemm_scaled_mm_op.register_fake(_output_like)
