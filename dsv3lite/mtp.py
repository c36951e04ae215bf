"""Multi-token prediction (MTP), [V3] §2.2 Eqs. 21-25.

V3 adds D sequential modules (D = 1). Module k predicts the token k+1 places ahead while
keeping the full causal chain: at position i it combines the previous depth's hidden
state h^{k-1}_i with the embedding of token t_{i+k}::

    h'^k_i = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))]          (Eq. 21)
    h^k    = TRM_k(h'^k)   over the shortened sequence               (Eq. 22)
    P^k    = OutHead(h^k)                                            (Eq. 23)

The embedding and the output head are the main model's own (the same Parameter
objects). The loss is L_MTP = λ/D Σ_k CE^k (Eq. 25), added to the main loss. At
inference the modules can be dropped, or used as a draft for speculative decoding.

We concatenate in the paper's order, h first; the released weights and vLLM put the
embedding first ([vLLM] ``deepseek_mtp.py``), which only permutes ``eh_proj``'s input columns.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .block import Block
from .config import ModelArgs
from .mla import AttnImpl, LatentKVCache
from .moe import RoutingStats
from .norm import RMSNorm

__all__ = ["MTPModule"]


class MTPModule(nn.Module):
    """One MTP depth: two RMSNorms, the 2d→d projection M_k, one block, a final norm.

    ``embed`` and ``head`` are not owned: the model passes its own modules at call time,
    so the sharing is by identity and no copy can drift apart.
    """

    def __init__(self, depth: int, args: ModelArgs):
        super().__init__()
        self.depth = depth
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)  # M_k
        self.block = Block(args.n_layers + depth - 1, args)
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, h_prev: torch.Tensor, next_embeddings: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, *,
                cache: Optional[LatentKVCache] = None, start_pos: int = 0,
                attn_impl: AttnImpl = "absorbed"
                ) -> tuple[torch.Tensor, Optional[RoutingStats]]:
        """h^k for the positions of ``h_prev``, and the routing stats of the block's MoE.

        Args:
            - h_prev: (B, T', dim) hidden states h^{k-1} for positions
              ``start_pos .. start_pos + T'-1`` (0 .. T'-1 without a cache).
            - next_embeddings: (B, T', dim) Emb(t_{i+k}) for the same positions.
            - cos, sin: RoPE tables for the same positions.
            - cache: Optional one-layer latent cache of this module's own block, for
              incremental drafting (:mod:`dsv3lite.generate`); layer 0 is used.
            - start_pos: Position of ``h_prev[:, 0]`` (only with a cache).
            - attn_impl: ``"naive"`` or ``"absorbed"`` decode attention (only with a cache).

        Returns:
            ``(h, stats)``: (B, T', dim) h^k (before the final norm, so depth k+1 can
            chain on it), and the block's :class:`~dsv3lite.moe.RoutingStats` (None when
            its FFN is dense).
        """
        merged = self.eh_proj(torch.cat([self.hnorm(h_prev), self.enorm(next_embeddings)], -1))
        if cache is None:
            return self.block(merged, cos, sin)
        return self.block(merged, cos, sin, cache, 0, start_pos, attn_impl)
