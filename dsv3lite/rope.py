"""Decoupled rotary position embedding, with YaRN context extension.

In MLA only a few dimensions carry position: the per-head query part q^R and one key
k^R shared by all heads (``qk_rope_head_dim`` dims each, [V3] Eqs. 3 and 8). Everything
else (the compressed latent and its up-projections) stays position-free, which is what
makes weight absorption exact at decode time ([V2] §2.1.3).

Rotation follows the official code: dimensions are rotated in *interleaved* pairs
(0, 1), (2, 3), ..., pair i turning at frequency θ^(-2i/d).

YaRN ([V3] §4.3): beyond the pre-training context, low-frequency pairs are slowed down
by the factor s, high-frequency pairs are kept, and a linear ramp blends the band in
between. Attention logits are then multiplied by mscale² with √t = 0.1·ln s + 1.
"""

from __future__ import annotations

import math

import torch

from .config import ModelArgs

__all__ = ["yarn_correction_range", "rope_frequencies", "yarn_mscale", "softmax_scale",
           "precompute_rope", "apply_rope"]


def _correction_dim(n_rotations: float, dim: int, base: float, seq_len: int) -> float:
    """The frequency index whose wavelength fits ``n_rotations`` times into ``seq_len``."""
    return dim * math.log(seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_correction_range(args: ModelArgs) -> tuple[int, int]:
    """Frequency indices (low, high) of YaRN's interpolation ramp.

    Indices below ``low`` rotate fast enough to keep their frequency; those above
    ``high`` are divided by ``rope_factor``. For V3 this is (10, 23) of 32.
    """
    dim = args.qk_rope_head_dim
    low = math.floor(_correction_dim(args.beta_fast, dim, args.rope_theta, args.original_seq_len))
    high = math.ceil(_correction_dim(args.beta_slow, dim, args.rope_theta, args.original_seq_len))
    return max(low, 0), min(high, dim - 1)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Angular frequency of each rotated pair, shape (qk_rope_head_dim // 2,), fp32.

    With YaRN enabled (``max_seq_len > original_seq_len``) the frequencies are blended
    between the original ones and the ones divided by ``rope_factor``.
    """
    dim = args.qk_rope_head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if args.yarn_enabled:
        low, high = yarn_correction_range(args)
        span = max(high - low, 1e-3)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / span).clamp(0, 1)
        keep = 1 - ramp  # 1: keep the original frequency, 0: fully interpolated
        freqs = freqs / args.rope_factor * (1 - keep) + freqs * keep
    return freqs.float()


def yarn_mscale(args: ModelArgs) -> float:
    """√t = 0.1·mscale·ln(s) + 1 with YaRN, else 1."""
    if not args.yarn_enabled:
        return 1.0
    return 0.1 * args.mscale * math.log(args.rope_factor) + 1.0


def softmax_scale(args: ModelArgs) -> float:
    """Attention logit scale: 1/√(d_h + d_h^R), times mscale² under YaRN.

    As in [V3-code] ``MLA.__init__``.
    """
    return args.qk_head_dim ** -0.5 * yarn_mscale(args) ** 2


def precompute_rope(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, qk_rope_head_dim // 2), fp32."""
    positions = torch.arange(args.max_seq_len, dtype=torch.float64)
    angles = torch.outer(positions, rope_frequencies(args).double())
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dimension.

    Args:
        x: (B, T, H, D) with D even.
        cos, sin: (T, D // 2) tables for the positions of x.

    Returns:
        A tensor like x, computed in fp32 and cast back to x's dtype.
    """
    x_pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    even, odd = x_pairs.unbind(-1)
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
