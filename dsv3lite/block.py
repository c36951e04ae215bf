"""One pre-norm transformer block: x + MLA(norm(x)), then + FFN(norm(x)).

The FFN is a dense SwiGLU MLP in the first ``n_dense_layers`` blocks and DeepSeekMoE
afterwards ([V3] §2.1, §4.2; [V3-code] ``Block``). A block returns its output and the
:class:`~dsv3lite.moe.RoutingStats` of its MoE layer (None for a dense block).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import ModelArgs
from .mla import MLA, AttnImpl, LatentKVCache
from .moe import MLP, MoE, RoutingStats
from .norm import RMSNorm

__all__ = ["Block"]


class Block(nn.Module):
    """Transformer block ``layer_id`` (MTP blocks are numbered after the main ones)."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = MLA(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = MoE(args) if args.is_moe_layer(layer_id) else MLP(args.dim, args.inter_dim, args.fp8)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[LatentKVCache] = None, cache_layer: int = 0,
                start_pos: int = 0, attn_impl: AttnImpl = "absorbed"
                ) -> tuple[torch.Tensor, Optional[RoutingStats]]:
        """``(x + attention + FFN, routing stats or None)`` for (B, T, dim) ``x``."""
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, cache_layer, start_pos, attn_impl)
        if isinstance(self.ffn, MoE):
            out, stats = self.ffn(self.ffn_norm(x))
            return x + out, stats
        return x + self.ffn(self.ffn_norm(x)), None
