"""The whole DeepSeek-V3-style model: embedding, blocks, final norm, head, MTP modules.

``Transformer(args)(tokens, targets)`` returns the logits and, with targets, the loss
parts: main next-token cross-entropy, the MTP cross-entropy (weighted by λ in the
total), and the sequence-wise balance loss ([V3] §2.2, Eqs. 17-20), plus the tokens each
expert of each MoE layer received, which the caller hands to
:meth:`Transformer.update_balance_biases` after the optimizer step. With a
:class:`~dsv3lite.mla.LatentKVCache` it decodes incrementally ([V3-code] ``MLA.forward``).

:func:`convert_to_fp8` switches a built model's eligible GEMMs to FP8 (``ModelArgs(fp8=True)``
builds them so from the start).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .block import Block
from .config import ModelArgs
from .fp8 import FP8Linear
from .losses import linear_cross_entropy
from .mla import MLA, AttnImpl, LatentKVCache
from .moe import MLP, Gate, GroupedExperts, MoE, RoutingStats
from .mtp import MTPModule
from .norm import RMSNorm
from .rope import precompute_rope

__all__ = ["Transformer", "ModelOutput", "LossBreakdown", "convert_to_fp8", "is_fp8_eligible"]


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
        """The four parts as Python floats, keyed by name (for logging; reads them back)."""
        return {name: float(getattr(self, name).detach()) for name in ("main", "mtp", "balance", "total")}


@dataclass
class ModelOutput:
    """What :meth:`Transformer.forward` returns.

    Attributes:
        - logits: (B, T, vocab_size) next-token logits (None with ``return_logits=False``).
        - loss: The loss parts when targets were given, else None.
        - hidden: (B, T, dim) last block's output before the final norm (h^0 for MTP).
        - expert_counts: (n_moe_layers, n_routed_experts) int64 tokens routed to each
          expert of each MoE layer in this pass, one row per layer of
          :meth:`Transformer.moe_layers` (main layers, then the MTP blocks'); the rows
          of layers that did not run (MTP without targets or with a cache) are zero.
          Sum them over a step's passes for :meth:`Transformer.update_balance_biases`.
    """

    logits: Optional[torch.Tensor]
    loss: Optional[LossBreakdown] = None
    hidden: Optional[torch.Tensor] = None
    expert_counts: Optional[torch.Tensor] = None


class Transformer(nn.Module):
    """A DeepSeek-V3-style language model built from :class:`~dsv3lite.ModelArgs`."""

    #: (max_seq_len, qk_rope_head_dim / 2) RoPE cosine table, a non-persistent buffer.
    rope_cos: torch.Tensor
    #: The matching sine table, (max_seq_len, qk_rope_head_dim / 2).
    rope_sin: torch.Tensor

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

    def update_balance_biases(self, counts: torch.Tensor, gamma: Optional[float] = None,
                              sync: bool = True) -> list[Union[float, torch.Tensor]]:
        """Apply the bias update to every MoE layer after an optimizer step.

        Args:
            - counts: (n_moe_layers, n_routed_experts) tokens per expert over the step:
              :attr:`ModelOutput.expert_counts`, summed over the step's forward passes.
            - gamma: Bias update speed γ (default ``args.bias_update_speed``).
            - sync: Return floats (True) or 0-dim device tensors, read nothing back (False).

        Returns:
            MaxVio of each MoE layer over the step's tokens.
        """
        moes = self.moe_layers()
        expected = (len(moes), self.args.n_routed_experts)
        if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != expected:
            what = (f"shape {tuple(counts.shape)}" if isinstance(counts, torch.Tensor)
                    else f"type {type(counts).__name__}")
            raise ValueError(f"counts has {what}: must be a {expected} tensor (MoE layers x "
                             "experts), the expert_counts of the step's forward passes")
        gamma = self.args.bias_update_speed if gamma is None else gamma
        return [moe.gate.balancer.update(c, gamma, sync) for moe, c in zip(moes, counts)]

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
            - tokens: (B, T) token ids.
            - targets: (B, T) next-token ids (-100 = ignore); enables the loss breakdown.
            - cache: A latent cache for incremental decoding (positions ``start_pos ..``).
            - start_pos: Position of ``tokens[:, 0]`` (only with a cache).
            - attn_impl: ``"naive"`` or ``"absorbed"`` decode attention (only with a cache).
            - mtp_lambda: λ for this step (default ``args.mtp_lambda``).
            - return_logits: With targets, False skips the (B, T, vocab) logits: the losses
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
        routing: list[RoutingStats] = []  # one entry per MoE layer, in order
        for i, layer in enumerate(self.layers):
            h, stats = layer(h, cos, sin, cache, i, start_pos, attn_impl)
            if stats is not None:
                routing.append(stats)
        if targets is None and not return_logits:
            raise ValueError("return_logits=False needs targets (it only changes how the "
                             "loss is computed)")
        logits = self.head(self.norm(h)) if return_logits else None
        if targets is None:
            return ModelOutput(logits=logits, hidden=h, expert_counts=self.stack_counts(routing))
        if targets.shape != tokens.shape:
            raise ValueError(f"targets has shape {tuple(targets.shape)}: expected "
                             f"{tuple(tokens.shape)} like tokens")
        loss, routing = self.loss_parts(tokens, targets, logits, h, routing,
                                        mtp=cache is None, mtp_lambda=mtp_lambda)
        return ModelOutput(logits=logits, loss=loss, hidden=h,
                           expert_counts=self.stack_counts(routing))

    def stack_counts(self, routing: Sequence[RoutingStats]) -> torch.Tensor:
        """:attr:`ModelOutput.expert_counts` from the stats of the MoE layers that ran
        (the first ``len(routing)`` of :meth:`moe_layers`); the rest get zero rows."""
        n_moe, n_experts = len(self.moe_layers()), self.args.n_routed_experts
        counts = [s.counts for s in routing]
        if len(counts) < n_moe:
            zeros = self.rope_cos.new_zeros(n_experts, dtype=torch.long)
            counts += [zeros] * (n_moe - len(counts))
        return (torch.stack(counts) if counts
                else self.rope_cos.new_zeros(0, n_experts, dtype=torch.long))

    def loss_parts(self, tokens: torch.Tensor, targets: torch.Tensor,
                   logits: Optional[torch.Tensor], h: torch.Tensor,
                   routing: Sequence[RoutingStats] = (), *, mtp: bool = True,
                   mtp_lambda: Optional[float] = None
                   ) -> tuple[LossBreakdown, list[RoutingStats]]:
        """The loss parts from the main logits and the last block's output ``h``.

        Runs the MTP modules (when ``mtp`` and the model has them) and averages the
        balance losses of ``routing`` (the main MoE layers' stats, in order) and of the
        MTP blocks. A pipeline's last stage calls it too (:mod:`dsv3lite.pipeline`), so
        that its loss is the same computation, bit for bit.

        Returns:
            The loss parts, and the routing stats of every MoE layer that ran: those of
            ``routing``, then the MTP blocks'.
        """
        fused = logits is None  # chunked head + loss (forward's return_logits=False)
        if logits is None:
            main = linear_cross_entropy(self.norm(h), self.head.weight, targets)
        else:
            main = _cross_entropy(logits, targets)
        routing = list(routing)
        mtp_loss = None
        if len(self.mtp) and mtp:
            mtp_loss, mtp_routing = self._mtp_loss(tokens, targets, h, fused)
            routing += mtp_routing
        mtp_loss = main.new_zeros(()) if mtp_loss is None else mtp_loss
        balances = [s.balance_loss for s in routing if s.balance_loss is not None]
        balance = (torch.stack(balances).mean() if balances and self.training
                   else main.new_zeros(()))
        lam = self.args.mtp_lambda if mtp_lambda is None else mtp_lambda
        total = main + lam * mtp_loss + balance
        return LossBreakdown(main, mtp_loss, balance, total), routing

    def _mtp_loss(self, tokens: torch.Tensor, targets: torch.Tensor, h: torch.Tensor,
                  fused: bool = False) -> tuple[Optional[torch.Tensor], list[RoutingStats]]:
        """(1/D) Σ_k CE^k: depth k at position i sees t_{i+k} and predicts target i+k.
        Also returns the MTP blocks' routing stats."""
        states, routing = self.mtp_states(tokens, h)
        if fused:
            losses = [linear_cross_entropy(s, self.head.weight, targets[:, k:])
                      for k, s in enumerate(states, start=1)]
        else:
            losses = [_cross_entropy(self.head(s), targets[:, k:])
                      for k, s in enumerate(states, start=1)]
        return (torch.stack(losses).mean() if losses else None), routing

    def mtp_logits(self, tokens: torch.Tensor, h: torch.Tensor) -> list[torch.Tensor]:
        """Draft logits of each MTP depth, for speculative decoding.

        Args:
            tokens: (B, T) input tokens; h: (B, T, dim) main hidden states for them.

        Returns:
            List over depths k of (B, T - k, vocab) logits predicting the token k+1 ahead.
        """
        return [self.head(s) for s in self.mtp_states(tokens, h)[0]]

    def mtp_states(self, tokens: torch.Tensor, h: torch.Tensor
                   ) -> tuple[list[torch.Tensor], list[RoutingStats]]:
        """The chain of MTP modules: each depth's normalised output, fed to the shared head.

        Depth k reads the previous depth's output (the main model's h for k = 1) at
        positions 0..T-k-1 and the embeddings of tokens k..T-1, so it keeps the causal chain
        ([V3] §2.2, Eq. 21). Returns a list over depths of (B, T - k, dim) tensors, and
        the routing stats of the depths' MoE layers.
        """
        out, routing = [], []
        for k, module in enumerate(self.mtp, start=1):
            n = tokens.shape[1] - k
            if n < 1:
                break
            h, stats = module(h[:, :n], self.embed(tokens[:, k:]),
                              self.rope_cos[:n], self.rope_sin[:n])
            out.append(module.norm(h))  # type: ignore[operator]  # ModuleList items are nn.Module
            if stats is not None:
                routing.append(stats)
        return out, routing


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


# ------------------------------------------------------------------------ FP8
def is_fp8_eligible(owner: nn.Module, linear: nn.Module) -> bool:
    """Whether ``linear``, a direct child of ``owner``, runs in FP8 (§3.3.1).

    True for plain ``nn.Linear`` children of MLA (attention projections) and of MLP
    (dense FFNs, routed and shared experts). Everything else stays in high precision:
    the embedding, output head, router, norms, attention core and MTP ``eh_proj``.
    """
    return isinstance(owner, (MLA, MLP)) and type(linear) is nn.Linear


def convert_to_fp8(model: nn.Module) -> list[str]:
    """Switch a built model's eligible GEMMs to FP8, in place ([V3] §3.3.1).

    Following §3.3.1 it converts the Linear projections of attention (MLA: ``wq``/``wq_a``,
    ``wq_b``, ``wkv_a``, ``wkv_b``, ``wo``) and of every SwiGLU FFN (dense FFNs and shared
    experts: ``w1``, ``w2``, ``w3``) to :class:`~dsv3lite.fp8.FP8Linear`, sharing their
    Parameters, and switches the routed experts (:class:`~dsv3lite.moe.GroupedExperts`)
    to their FP8 path. It leaves in higher precision the embedding, the output head, the
    router (``Gate``), the norms and the attention core (softmax(QK^T)V), as the paper
    does, and also the MTP projection ``eh_proj``: our call, since the paper does not list
    it among the FP8 GEMMs and it merges two separately normalised streams. The absorbed
    MLA decode reads ``wkv_b.weight`` directly, in high precision.
    ``Transformer(ModelArgs(..., fp8=True))`` builds the same layers in FP8 from the start.

    Args:
        model: A :class:`Transformer` or any module containing MLA / MLP / GroupedExperts.

    Returns:
        Qualified names of the Linears converted by this call, a routed expert's as
        ``...experts.{e}.w1`` (already converted ones are left alone, so calling twice
        converts nothing more).
    """
    converted = []
    for owner_name, owner in list(model.named_modules()):
        if isinstance(owner, GroupedExperts) and not owner.fp8:
            owner.fp8 = True  # grouped FP8 GEMMs on a GPU, else one expert at a time
            converted += [f"{owner_name}.{e}.{w}" for e in range(owner.n_experts)
                          for w in ("w1", "w2", "w3")]
        for child_name, child in list(owner.named_children()):
            if is_fp8_eligible(owner, child):
                setattr(owner, child_name, FP8Linear.from_linear(child))
                converted.append(f"{owner_name}.{child_name}" if owner_name else child_name)
    return converted
