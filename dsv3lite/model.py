"""The whole DeepSeek-V3-style model: embedding, blocks, final norm, head, MTP modules.

``Transformer(args)(tokens, targets)`` returns the logits and, with targets, the loss
parts: main next-token cross-entropy, the MTP cross-entropy (weighted by λ in the
total), and the sequence-wise balance loss ([V3] §2.2, Eqs. 17-20). With a
:class:`~dsv3lite.mla.LatentKVCache` it decodes incrementally ([V3-code] ``MLA.forward``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .block import Block
from .config import ModelArgs
from .mla import AttnImpl, LatentKVCache
from .losses import linear_cross_entropy
from .moe import Gate, GroupedExperts, MoE
from .mtp import MTPModule
from .norm import RMSNorm
from .rope import precompute_rope

__all__ = ["Transformer", "ModelOutput", "LossBreakdown"]


@dataclass
class LossBreakdown:
    """Loss parts of one forward pass (scalars).

    Attributes:
        main: Next-token cross-entropy.
        mtp: MTP cross-entropy averaged over depths, unweighted (0 without MTP).
        balance: Sequence-wise balance loss averaged over MoE layers (training mode only).
        total: main + λ·mtp + balance, the quantity to minimise.
    """

    main: torch.Tensor
    mtp: torch.Tensor
    balance: torch.Tensor
    total: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name).detach()) for name in ("main", "mtp", "balance", "total")}


@dataclass
class ModelOutput:
    """Attributes:
        logits: (B, T, vocab_size) next-token logits (None with ``return_logits=False``).
        loss: The loss parts when targets were given, else None.
        hidden: (B, T, dim) last block's output before the final norm (h^0 for MTP).
    """

    logits: Optional[torch.Tensor]
    loss: Optional[LossBreakdown] = None
    hidden: Optional[torch.Tensor] = None


class Transformer(nn.Module):
    """A DeepSeek-V3-style language model built from :class:`~dsv3lite.ModelArgs`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(k, args) for k in range(1, args.n_mtp_depth + 1))
        cos, sin = precompute_rope(args)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        if args.fp8:
            from .fp8 import convert_to_fp8
            convert_to_fp8(self)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix ([V3] §4.2: 0.006), ones for norm gains."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, Gate)):
                nn.init.normal_(module.weight, std=self.args.init_std)
            elif isinstance(module, GroupedExperts):  # expert by expert, w1, w2, w3:
                for e in range(module.n_experts):      # the draws of one Linear each
                    for w in (module.w1, module.w2, module.w3):
                        nn.init.normal_(w[e], std=self.args.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    # ------------------------------------------------------------------ MoE upkeep
    def moe_layers(self) -> list[MoE]:
        """Every MoE layer, the MTP blocks' included, in order."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def update_balance_biases(self, gamma: Optional[float] = None,
                              sync: bool = True) -> list:
        """Apply the bias update to every MoE layer after an optimizer step.

        Args:
            gamma: Bias update speed γ (default ``args.bias_update_speed``).
            sync: Return floats (True) or 0-dim device tensors, read nothing back (False).

        Returns:
            MaxVio of each MoE layer over the step's tokens.
        """
        gamma = self.args.bias_update_speed if gamma is None else gamma
        return [moe.gate.balancer.update(gamma, sync) for moe in self.moe_layers()]

    def expert_counts(self) -> torch.Tensor:
        """(n_moe_layers, n_routed_experts) tokens per expert in the last updated step."""
        return torch.stack([m.gate.balancer.last_counts.cpu() for m in self.moe_layers()])

    def drop_mtp(self) -> "Transformer":
        """Remove the MTP modules (inference does not need them); returns self."""
        self.mtp = nn.ModuleList()
        return self

    def new_cache(self, batch_size: int, max_len: Optional[int] = None,
                  dtype: Optional[torch.dtype] = None) -> LatentKVCache:
        """An empty latent cache for the main model's layers, on the model's device."""
        weight = self.embed.weight
        return LatentKVCache(self.args, batch_size, max_len, device=weight.device,
                             dtype=dtype or weight.dtype)

    # ------------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                cache: Optional[LatentKVCache] = None, start_pos: int = 0,
                attn_impl: AttnImpl = "absorbed",
                mtp_lambda: Optional[float] = None, return_logits: bool = True) -> ModelOutput:
        """Run the model.

        Args:
            tokens: (B, T) token ids.
            targets: (B, T) next-token ids (-100 = ignore); enables the loss breakdown.
            cache: A latent cache for incremental decoding (positions ``start_pos ..``).
            start_pos: Position of ``tokens[:, 0]`` (only with a cache).
            attn_impl: ``"naive"`` or ``"absorbed"`` decode attention (only with a cache).
            mtp_lambda: λ for this step (default ``args.mtp_lambda``).
            return_logits: With targets, False skips the (B, T, vocab) logits: the losses
                then go through :func:`~dsv3lite.losses.linear_cross_entropy`, which never
                holds more than a chunk of them (``logits`` is None in the output). Same
                loss up to rounding; the trainer uses it on CUDA.

        Returns:
            :class:`ModelOutput`.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens has shape {tuple(tokens.shape)}: expected (batch, seq_len)")
        B, T = tokens.shape
        if start_pos + T > self.args.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + T} exceed "
                             f"max_seq_len={self.args.max_seq_len}")
        if cache is None and start_pos != 0:
            raise ValueError(f"start_pos={start_pos} needs a cache (positions >0 are decoding)")
        cos = self.rope_cos[start_pos:start_pos + T]
        sin = self.rope_sin[start_pos:start_pos + T]
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cache, i, start_pos, attn_impl)
        if targets is None and not return_logits:
            raise ValueError("return_logits=False needs targets (it only changes how the "
                             "loss is computed)")
        logits = self.head(self.norm(h)) if return_logits else None
        if targets is None:
            return ModelOutput(logits=logits, hidden=h)
        if targets.shape != tokens.shape:
            raise ValueError(f"targets has shape {tuple(targets.shape)}: expected "
                             f"{tuple(tokens.shape)} like tokens")
        loss = self.loss_parts(tokens, targets, logits, h, mtp=cache is None,
                               mtp_lambda=mtp_lambda)
        return ModelOutput(logits=logits, loss=loss, hidden=h)

    def loss_parts(self, tokens: torch.Tensor, targets: torch.Tensor,
                   logits: Optional[torch.Tensor],
                   h: torch.Tensor, *, mtp: bool = True,
                   mtp_lambda: Optional[float] = None) -> LossBreakdown:
        """The loss parts from the main logits and the last block's output ``h``.

        Runs the MTP modules (when ``mtp`` and the model has them), then collects and
        clears the balance losses the MoE layers left in ``balance_loss`` during this
        forward. A pipeline's last stage calls it too (:mod:`dsv3lite.pipeline`), so
        that its loss is the same computation, bit for bit.
        """
        fused = logits is None  # chunked head + loss (forward's return_logits=False)
        if fused:
            main = linear_cross_entropy(self.norm(h), self.head.weight, targets)
        else:
            main = _cross_entropy(logits, targets)
        mtp_loss = (self._mtp_loss(tokens, targets, h, fused) if len(self.mtp) and mtp
                    else None)
        mtp_loss = main.new_zeros(()) if mtp_loss is None else mtp_loss
        moes = self.moe_layers()
        balances = [m.balance_loss for m in moes if self.training and m.balance_loss is not None]
        balance = torch.stack(balances).mean() if balances else main.new_zeros(())
        lam = self.args.mtp_lambda if mtp_lambda is None else mtp_lambda
        total = main + lam * mtp_loss + balance
        for m in moes:
            m.balance_loss = None
        return LossBreakdown(main, mtp_loss, balance, total)

    def _mtp_loss(self, tokens: torch.Tensor, targets: torch.Tensor, h: torch.Tensor,
                  fused: bool = False) -> Optional[torch.Tensor]:
        """(1/D) Σ_k CE^k: depth k at position i sees t_{i+k} and predicts target i+k."""
        states = self.mtp_states(tokens, h)
        if fused:
            losses = [linear_cross_entropy(s, self.head.weight, targets[:, k:])
                      for k, s in enumerate(states, start=1)]
        else:
            losses = [_cross_entropy(self.head(s), targets[:, k:])
                      for k, s in enumerate(states, start=1)]
        return torch.stack(losses).mean() if losses else None

    def mtp_logits(self, tokens: torch.Tensor, h: torch.Tensor) -> list[torch.Tensor]:
        """Draft logits of each MTP depth, for speculative decoding.

        Args:
            tokens: (B, T) input tokens; h: (B, T, dim) main hidden states for them.

        Returns:
            List over depths k of (B, T - k, vocab) logits predicting the token k+1 ahead.
        """
        return [self.head(s) for s in self.mtp_states(tokens, h)]

    def mtp_states(self, tokens: torch.Tensor, h: torch.Tensor) -> list[torch.Tensor]:
        """The chain of MTP modules: each depth's normalised output, fed to the shared head.

        Depth k reads the previous depth's output (the main model's h for k = 1) at
        positions 0..T-k-1 and the embeddings of tokens k..T-1, so it keeps the causal chain
        ([V3] §2.2, Eq. 21). Returns a list over depths of (B, T - k, dim) tensors.
        """
        out = []
        for k, module in enumerate(self.mtp, start=1):
            n = tokens.shape[1] - k
            if n < 1:
                break
            h = module(h[:, :n], self.embed(tokens[:, k:]), self.rope_cos[:n], self.rope_sin[:n])
            out.append(module.norm(h))
        return out


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
