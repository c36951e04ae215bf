"""Fine-grained FP8 quantization and the block-scaled GEMM, in plain PyTorch ([V3] §3.3.2).

E4M3 keeps only 3 mantissa bits (:mod:`dsv3lite.fp8.e4m3`), so one scale for a whole
tensor lets a single outlier push every other value into the subnormals. DeepSeek-V3
gives each small tile its own scale instead, computed online from the tile itself::

    amax = max(|x_tile|, 1e-30)     s = amax / 448      q = E4M3(x_tile / s)

so the tile's largest element maps onto 448 and ``q · s`` recovers the tile. The
tiles follow the GEMM's inner dimension K ([V3] §3.3.2):

- activations and output gradients: **1x128** (one token, 128 channels);
- the same tensors in **128x1** tiles (128 tokens, one channel) for the weight gradient,
  whose inner dimension is the token axis (V3 re-quantizes its stored 1x128 FP8 tiles
  into them, [V3] §3.5.2; this package quantizes them from high precision, see
  :mod:`~dsv3lite.fp8.linear`);
- weights: **128x128** blocks.

The GEMM then multiplies each 128-wide K-block's partial product by its two scales and
adds it to an fp32 accumulator: the paper's promotion to CUDA cores every N_C = 128
elements ([V3] §3.3.2). This module is the reference every fast path is tested against.

Dimensions that are not multiples of 128 are **zero-padded**: the last tile of a row
(or block) simply holds fewer real elements, and its scale comes from those alone, as in
the released checkpoints ([V3-code] ``inference/kernel.py``). Scale tensors therefore have
``ceil(n / 128)`` entries along a tiled axis. Optionally (``scale_fmt="ue8m0"``, the
official name) scales are rounded up to a power of 2, as V3 does for the inputs of the
Linear after attention, which it re-tiles, and for the activations of the MoE dispatch
([V3] §3.3.3).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange

from .e4m3 import E4M3_DTYPE, E4M3_MAX, e4m3_to_float32

__all__ = ["BLOCK_SIZE", "AMAX_FLOOR", "SCALE_FORMATS", "round_scale_to_power_of_2",
           "tile_scale", "quantize_tiles", "dequantize_tiles", "act_quant_ref",
           "weight_quant_ref", "weight_dequant_ref", "fp8_gemm_ref", "check_gemm_operands"]

BLOCK_SIZE = 128
"""Tile length along K: 1x128 activation tiles, 128x128 weight blocks."""
AMAX_FLOOR = 1e-30
"""amax is clamped at this floor so an all-zero tile gets a finite, non-zero scale.

The official inference kernel floors amax at 1e-4, which only ever sees activations.
Training also quantizes gradients, and with the loss averaged over the tokens of a batch
their tiles are often far below 1e-4 (in chapter 5's model, the median token's largest
gradient entry is 1e-7 to 2e-5 in most layers): a 1e-4 floor would map them onto the
bottom of the E4M3 grid, into the subnormals. 1e-30 keeps s = amax / 448 a normal fp32
number and only matters for tiles that are all zero."""
SCALE_FORMATS = (None, "ue8m0")
"""``None``: s = amax / 448 exactly; ``"ue8m0"``: s rounded up to a power of 2."""
QUANTIZABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def ceil_div(n: int, d: int) -> int:
    return -(-n // d)


def check_scale_fmt(scale_fmt: Optional[str]) -> None:
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"scale_fmt={scale_fmt!r} is invalid: must be one of {SCALE_FORMATS}")


def check_quantizable(name: str, x: torch.Tensor, ndim: Optional[int] = None) -> None:
    """Raise a ValueError unless ``x`` is a float tensor (of ``ndim`` dims) to quantize."""
    if x.dtype not in QUANTIZABLE_DTYPES:
        raise ValueError(f"{name}.dtype={x.dtype} is invalid: must be one of "
                         f"{QUANTIZABLE_DTYPES} (a high-precision tensor to quantize)")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: must be {ndim}-D")
    if ndim is None and x.dim() < 1:
        raise ValueError(f"{name} is a scalar: must have at least one dimension")


def round_scale_to_power_of_2(s: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 scales up to the next power of 2 (``ue8m0`` scales).

    Exact bit arithmetic, no log2: adding 0x7FFFFF to the bits carries into the exponent
    unless the mantissa is already zero; clearing the mantissa then leaves 2^ceil(log2 s).
    The Triton kernels do the same, so both agree bit for bit.

    A NaN scale (a tile holding a NaN) stays NaN. The bit trick alone would turn it
    into 0 (0x7FC00000 + 0x7FFFFF carries out of the exponent), and a zero scale would
    dequantize the tile's finite elements to 0: the NaN would survive only in its own
    element, and a check of the scales for NaN would miss it. +Inf stays +Inf.
    """
    s = s.float()
    bits = s.view(torch.int32)
    rounded = ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)
    return torch.where(s.isnan(), s, rounded)


def tile_scale(amax: torch.Tensor, scale_fmt: Optional[str] = None) -> torch.Tensor:
    """The scale of each tile: s = max(amax, 1e-30) / 448, correctly rounded in fp32.

    The divisor is a tensor on purpose. Divided by a Python number, a CUDA tensor is
    multiplied by the reciprocal 1/448 instead, which is one bit off in about half of
    the tiles; the Triton kernels divide exactly (``div_rn``), and the GPU tests compare
    scales bit for bit.

    Args:
        amax: fp32 tensor of per-tile ``max |x|``.
        scale_fmt: ``None`` or ``"ue8m0"`` (round up to a power of 2).

    Returns:
        fp32 scales like ``amax``.
    """
    amax = amax.float().clamp(min=AMAX_FLOOR)
    s = amax / torch.full_like(amax, E4M3_MAX)  # exact division on every device
    return round_scale_to_power_of_2(s) if scale_fmt == "ue8m0" else s


def quantize_tiles(x: torch.Tensor, tile: tuple[int, int],
                   scale_fmt: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D tensor to E4M3 with one online scale per ``tile``.

    Args:
        x: (R, C) float tensor.

        tile: (tile_rows, tile_cols), e.g. (1, 128), (128, 128), or (R, C) for one
            per-tensor scale. Partial tiles at the edges are zero-padded.

        scale_fmt: ``None`` or ``"ue8m0"`` (power-of-2 scales).

    Returns:
        ``(q, s)``: q (R, C) in ``float8_e4m3fn``; s (ceil(R/tile_rows), ceil(C/tile_cols))
        fp32 scales, so that ``q · s`` approximates x tile by tile.
    """
    check_quantizable("x", x, ndim=2)
    check_scale_fmt(scale_fmt)
    tr, tc = tile
    if tr < 1 or tc < 1:
        raise ValueError(f"tile={tile} is invalid: both sides must be >= 1")
    R, C = x.shape
    pad_r, pad_c = ceil_div(R, tr) * tr - R, ceil_div(C, tc) * tc - C
    padded = F.pad(x.float(), (0, pad_c, 0, pad_r)) if pad_r or pad_c else x.float()
    tiles = rearrange(padded, "(nr r) (nc c) -> nr r nc c", r=tr, c=tc)  # a view
    s = tile_scale(tiles.abs().amax(dim=(1, 3)), scale_fmt)  # (nr, nc)
    q = (tiles / s[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3_DTYPE)
    q = rearrange(q, "nr r nc c -> (nr r) (nc c)")[:R, :C].contiguous()
    return q, s


def dequantize_tiles(q: torch.Tensor, s: torch.Tensor, tile: tuple[int, int],
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_tiles`: every element times its tile's scale.

    Args:
        q: (R, C) E4M3 tensor.
        s: (ceil(R/tile_rows), ceil(C/tile_cols)) scales.
        tile: The tile shape used to quantize.
        out_dtype: Dtype of the result (the product is formed in fp32 or wider).

    Returns:
        (R, C) tensor in ``out_dtype``.
    """
    tr, tc = tile
    R, C = q.shape
    if s.shape != (ceil_div(R, tr), ceil_div(C, tc)):
        raise ValueError(f"scales of shape {tuple(s.shape)} do not match q of shape "
                         f"{(R, C)} in {tile} tiles: expected "
                         f"{(ceil_div(R, tr), ceil_div(C, tc))}")
    wide = torch.float64 if out_dtype == torch.float64 else torch.float32
    per_element = s.to(wide).repeat_interleave(tr, 0)[:R].repeat_interleave(tc, 1)[:, :C]
    return (e4m3_to_float32(q).to(wide) * per_element).to(out_dtype)


def act_quant_ref(x: torch.Tensor, scale_fmt: Optional[str] = None,
                  transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation quantization: 1x128 tiles along the last dim, or 128x1 for Wgrad.

    Args:
        x: (..., K) activations or output gradients; leading dims are tokens.

        scale_fmt: ``None`` or ``"ue8m0"``.

        transpose: False: 1x128 tiles (one token, 128 channels), returns q like x and
            s (..., ceil(K/128)). True: 128x1 tiles (128 tokens, one channel) of the
            (M, K) token matrix, returned transposed so that the token axis is
            contiguous for the weight-gradient GEMM: q (K, M), s (K, ceil(M/128)).

    Returns:
        ``(q, s)`` as above, q in ``float8_e4m3fn`` and s in fp32.
    """
    check_quantizable("x", x)
    x2 = x.reshape(-1, x.shape[-1])  # (M, K) tokens x channels
    if transpose:  # a contiguous copy first: tiles then run along memory (2x faster)
        return quantize_tiles(x2.t().contiguous(), (1, BLOCK_SIZE), scale_fmt)
    q, s = quantize_tiles(x2, (1, BLOCK_SIZE), scale_fmt)
    return q.view(x.shape), s.view(*x.shape[:-1], -1)


def weight_quant_ref(w: torch.Tensor,
                     scale_fmt: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight quantization in 128x128 blocks.

    Args:
        w: (N, K) weight, laid out like ``nn.Linear.weight``.
        scale_fmt: ``None`` or ``"ue8m0"``.

    Returns:
        ``(q, s)``: q (N, K) E4M3, s (ceil(N/128), ceil(K/128)) fp32.
    """
    check_quantizable("w", w, ndim=2)
    return quantize_tiles(w, (BLOCK_SIZE, BLOCK_SIZE), scale_fmt)


def weight_dequant_ref(q: torch.Tensor, s: torch.Tensor,
                       out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dequantize a 128x128-block weight (the official ``weight_dequant``).

    Args:
        q: (N, K) E4M3 weight.

        s: (ceil(N/128), ceil(K/128)) scales.

        out_dtype: Result dtype; default ``torch.get_default_dtype()`` as in the
            official code.

    Returns:
        (N, K) weight in ``out_dtype``.
    """
    if q.dtype != E4M3_DTYPE or q.dim() != 2:
        raise ValueError(f"q has dtype {q.dtype} and shape {tuple(q.shape)}: "
                         f"must be a 2-D {E4M3_DTYPE} tensor")
    out_dtype = out_dtype or torch.get_default_dtype()
    return dequantize_tiles(q, s, (BLOCK_SIZE, BLOCK_SIZE), out_dtype)


def check_gemm_operands(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor,
                        b_s: torch.Tensor) -> int:
    """Validate the operands of ``a @ b^T`` and tell how ``b`` is scaled.

    Args:
        a: (..., K) E4M3, scaled in 1x128 tiles by a_s (..., ceil(K/128)).

        b: (N, K) E4M3, scaled either in 128x128 blocks by b_s (ceil(N/128), ceil(K/128))
            (a weight) or in 1x128 tiles by b_s (N, ceil(K/128)) (a re-tiled activation,
            for the weight gradient).

    Returns:
        How many rows of b share one scale row: 128 (blocks) or 1 (tiles).
    """
    for name, t in (("a", a), ("b", b)):
        if t.dtype != E4M3_DTYPE:
            raise ValueError(f"{name}.dtype={t.dtype} is invalid: must be {E4M3_DTYPE}")
    for name, t in (("a_s", a_s), ("b_s", b_s)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name}.dtype={t.dtype} is invalid: scales must be float32")
    if b.dim() != 2 or a.dim() < 1:
        raise ValueError(f"b has shape {tuple(b.shape)}: must be 2-D (N, K) like "
                         "nn.Linear.weight, and a must be (..., K)")
    (N, K), nk = b.shape, ceil_div(b.shape[1], BLOCK_SIZE)
    if a.shape[-1] != K:
        raise ValueError(f"a has shape {tuple(a.shape)}: its last dim must equal "
                         f"b's K={K} (b has shape {tuple(b.shape)})")
    if a_s.shape != (*a.shape[:-1], nk):
        raise ValueError(f"a_s has shape {tuple(a_s.shape)}: must be "
                         f"{(*a.shape[:-1], nk)} (one scale per 1x128 tile of a)")
    if b_s.shape == (ceil_div(N, BLOCK_SIZE), nk):
        return BLOCK_SIZE
    if b_s.shape == (N, nk):
        return 1
    raise ValueError(f"b_s has shape {tuple(b_s.shape)}: must be "
                     f"{(ceil_div(N, BLOCK_SIZE), nk)} (128x128 blocks) or {(N, nk)} "
                     "(1x128 tiles)")


def fp8_gemm_ref(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                 out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Block-scaled FP8 GEMM ``c = a @ b^T`` with fp32 promotion every 128 K-elements.

    Args:
        a, a_s, b, b_s: As in :func:`check_gemm_operands`.
        out_dtype: Result dtype; default ``torch.get_default_dtype()``.

    Returns:
        (..., N) tensor in ``out_dtype``.
    """
    group_n = check_gemm_operands(a, a_s, b, b_s)
    (N, K), nk = b.shape, a_s.shape[-1]
    a2, a_s2 = a.reshape(-1, K), a_s.reshape(-1, nk)  # (M, K), (M, nk)
    b_s_rows = b_s.repeat_interleave(group_n, dim=0)[:N]  # (N, nk): each row's scales
    a32, b32 = e4m3_to_float32(a2), e4m3_to_float32(b)  # exact
    acc = torch.zeros(a2.shape[0], N, dtype=torch.float32, device=a.device)
    with torch.autocast(a.device.type, enabled=False):  # the products stay in fp32
        for i in range(nk):
            k = slice(i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE)
            partial = a32[:, k] @ b32[:, k].t()  # (M, N): one K-block, unscaled
            partial.mul_(a_s2[:, i, None]).mul_(b_s_rows[None, :, i])  # dequantize
            acc += partial
    return acc.to(out_dtype or torch.get_default_dtype()).view(*a.shape[:-1], N)
