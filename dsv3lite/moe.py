"""DeepSeekMoE with auxiliary-loss-free load balancing, [V3] §2.1.2 Eqs. 12-20.

Each MoE layer has ``n_shared_experts`` experts every token uses and
``n_routed_experts`` fine-grained experts of which each token uses
``n_activated_experts`` ([V3] §2.1.2, §4.2). The router, exactly as implemented in the
official code ([V3-code] ``Gate.forward``):

1. affinity s = sigmoid(u·e_i) (Eq. 15), kept unbiased;
2. selection scores s + b, with b the balancing bias (used ONLY to choose);
3. group-limited routing: a group's score is the sum of its top-2 selection scores,
   keep the ``n_limited_groups`` best groups;
4. top-K experts among the kept groups by selection score (Eq. 16);
5. gates = the unbiased s of the chosen experts / their sum × ``route_scale`` (Eq. 13).

No token is ever dropped. The bias b is no Parameter: :class:`BiasBalancer` owns it
and moves it by b_i += γ·sign(mean load − load_i) after each optimizer step ([LF]
Alg. 1; [V3] §2.1.2). A small sequence-wise balance loss (α = 1e-4) complements
it ([V3] Eqs. 17-20, §4.2).

The layer keeps no record of what it routed: its forward returns the output together
with a :class:`RoutingStats` (tokens per expert, and the balance loss in training), the
model sums those on the way out, and the caller hands the step's counts to
:meth:`BiasBalancer.update`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .fp8 import fp8_linear, grouped_fp8_experts, linear_class, use_triton
from .fp8.segments import ALIGN, pad_segments, unpad

__all__ = ["MLP", "Gate", "BiasBalancer", "GroupedExperts", "MoE", "RoutingStats", "MOE_IMPLS",
           "EXPERT_PATHS", "expert_path", "grouped_mm_without_sync", "max_violation",
           "sequence_balance_loss"]

#: The values of ``ModelArgs.moe_impl``: ``"grouped"`` runs the routed experts without a
#: host sync (:func:`expert_path` picks how), ``"loop"`` one expert at a time (the reference).
MOE_IMPLS = ("grouped", "loop")
EXPERT_PATHS = ("grouped_mm", "segments", "fp8_grouped", "loop")
"""The computations :meth:`GroupedExperts.forward` can run; :func:`expert_path` picks one."""
_grouped_mm_fast: dict[int, bool] = {}  # CUDA device index -> grouped_mm_without_sync


class MLP(nn.Module):
    """SwiGLU feed-forward block: w2(silu(w1 x) * w3 x). Used for dense FFNs and experts."""

    def __init__(self, dim: int, inter_dim: int, fp8: bool = False):
        super().__init__()
        Linear = linear_class(fp8)  # the GEMM backend: FP8Linear with fp8=True (§3.3.1)
        self.w1 = Linear(dim, inter_dim, bias=False)
        self.w2 = Linear(inter_dim, dim, bias=False)
        self.w3 = Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The FFN output (..., dim) for tokens ``x`` (..., dim)."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@torch.compiler.assume_constant_result
def grouped_mm_without_sync(device_index: int) -> bool:
    """Whether bf16 ``torch._grouped_mm`` runs on CUDA device ``device_index`` as one kernel.

    Elsewhere (other GPUs, ROCm, and any dtype but bf16 everywhere) torch falls back to
    one matmul per group, which first copies the group offsets to the host: a
    synchronisation in every MoE layer. A constant while tracing (read outside the graph).
    """
    if device_index not in _grouped_mm_fast:
        major, minor = torch.cuda.get_device_capability(device_index)
        # torch's CUTLASS kernel is built for sm_90 and sm_100 only (ATen GroupedBlas.cpp)
        _grouped_mm_fast[device_index] = torch.version.hip is None and (
            (major, minor) == (9, 0) or major == 10)
    return _grouped_mm_fast[device_index]


def expert_path(impl: str, fp8: bool, device: torch.device, dtype: torch.dtype, *,
                fp8_kernels: bool, compiling: bool) -> str:
    """Which computation runs the routed experts, one of :data:`EXPERT_PATHS`.

    - ``"fp8_grouped"``: FP8 experts as grouped FP8 GEMMs over 128-aligned segments
      (:func:`~dsv3lite.fp8.grouped_fp8_experts`), where the FP8 kernels run, and under
      ``torch.compile`` everywhere (the references inside are opaque ops there);
    - ``"loop"``: ``impl="loop"``, and FP8 experts in eager mode without the kernels:
      one expert at a time after reading the counts on the host (the reference);
    - ``"grouped_mm"``: ``torch._grouped_mm`` where it needs no host sync (bf16 on the
      CPU or on sm_90/sm_100) and on the CPU in eager mode in any dtype (a CPU has no
      device to wait for, and the CPU numerics stay what they always were);
    - ``"segments"``: everything else (fp32 on a GPU, the float32 CPU default under
      ``torch.compile``, whose ``_grouped_mm`` takes bf16 only, GPUs without the
      one-launch kernel): batched matmuls over 128-row segments, no host sync, in the
      input's own precision (:meth:`GroupedExperts.forward`).

    Args:
        - impl: ``"grouped"`` or ``"loop"`` (``ModelArgs.moe_impl``).
        - fp8: Whether the experts run in FP8.
        - device, dtype: Where the tokens are and the dtype the GEMMs run in (the
          autocast dtype when autocast is on).
        - fp8_kernels: Whether the FP8 Triton kernels run on ``device``
          (:func:`~dsv3lite.fp8.use_triton`).
        - compiling: Whether this is traced by ``torch.compile``.
    """
    if impl not in MOE_IMPLS:
        raise ValueError(f"impl={impl!r} is invalid: choose one of {', '.join(MOE_IMPLS)}")
    if fp8:
        return "fp8_grouped" if impl == "grouped" and (fp8_kernels or compiling) else "loop"
    if impl == "loop":
        return "loop"
    if dtype == torch.bfloat16 and (device.type == "cpu" or (
            device.type == "cuda" and grouped_mm_without_sync(
                torch.cuda.current_device() if device.index is None else device.index))):
        return "grouped_mm"
    if device.type == "cpu" and not compiling:
        return "grouped_mm"
    return "segments"


def max_violation(counts: torch.Tensor) -> float:
    """MaxVio = max_i(load_i − mean load) / mean load ([LF] Eq. 4). 0 is perfect balance."""
    counts = counts.float()
    mean = counts.mean()
    if mean <= 0:
        return 0.0
    return float((counts.max() - mean) / mean)


@dataclass
class RoutingStats:
    """What one MoE layer's forward pass reports besides its output.

    Attributes:
        - counts: (N_r,) int64 tokens routed to each expert (a token counts once for each
          of its K experts), on the layer's device.
        - balance_loss: The sequence-wise balance loss of this pass (a scalar with
          gradient) in training mode, None in eval mode.
    """

    counts: torch.Tensor
    balance_loss: Optional[torch.Tensor] = None


class BiasBalancer(nn.Module):
    """Owner of the per-expert routing bias b and of its update rule.

    The bias is a buffer (saved in checkpoints, moved by ``.to``), never a Parameter:
    no gradient reaches it. After the optimizer step, :meth:`update` takes the expert
    counts of the step's forward passes (summed by the caller) and applies
    b_i += γ·sign(mean(c) − c_i).
    """

    #: (n_experts,) float32 routing bias b, a buffer (registered in ``__init__``).
    bias: torch.Tensor

    def __init__(self, n_experts: int):
        super().__init__()
        self.n_experts = n_experts
        self.register_buffer("bias", torch.zeros(n_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        """Follow ``.to(device)`` but never a dtype change: the bias stays fp32 ([V3]
        §3.3.1 keeps the gating in high precision). In bf16, a bias near 1 could not move
        by γ = 0.001 at all (bf16's spacing there is 2^-7)."""
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)  # the fp32 values, moved
        return self

    @torch.no_grad()
    def update(self, counts: torch.Tensor, gamma: float,
               sync: bool = True) -> Union[float, torch.Tensor]:
        """Apply the sign rule to the step's ``counts`` with speed ``gamma``; return MaxVio.

        Overloaded experts (count above the mean) lose γ, underloaded ones gain γ.
        Experts exactly at the mean are left alone.

        Args:
            - counts: (N_r,) tokens each expert received over the step (any real dtype):
              :attr:`RoutingStats.counts`, summed over the step's forward passes.
            - gamma: Bias update speed γ >= 0 (0 only measures).
            - sync: With False nothing is read back to the host: MaxVio is returned as a
              0-dim tensor on the bias's device.

        Returns:
            MaxVio of ``counts`` ([LF] Eq. 4), a float (``sync``) or a 0-dim tensor.
        """
        if not isinstance(counts, torch.Tensor) or counts.shape != (self.n_experts,):
            what = (f"shape {tuple(counts.shape)}" if isinstance(counts, torch.Tensor)
                    else f"type {type(counts).__name__}")
            raise ValueError(f"counts has {what}: must be a ({self.n_experts},) tensor of "
                             "tokens per expert")
        if gamma < 0:
            raise ValueError(f"gamma={gamma} is invalid: the bias update speed must be >= 0")
        counts = counts.to(self.bias)
        self.bias += gamma * torch.sign(counts.mean() - counts)
        mean = counts.mean()
        vio = torch.where(mean > 0, (counts.max() - mean) / mean.clamp(min=1e-30),
                          torch.zeros_like(mean))  # max_violation without a branch
        return vio.item() if sync else vio


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, top_k: int,
                          alpha: float) -> torch.Tensor:
    """Complementary sequence-wise balance loss L_Bal = α Σ_i f_i P_i ([V3] Eqs. 17-20).

    Args:
        scores: (B, T, N_r) unbiased sigmoid affinities s_{i,t}.
        indices: (B, T, K_r) experts chosen for each token.
        top_k: K_r.
        alpha: α.

    Returns:
        A scalar: the loss of each sequence, averaged over the B sequences. It equals α
        at perfect balance (f_i = 1, P_i = 1/N_r).

    Eq. 18's indicator is written with the unbiased Top-K; we count the experts the
    router really chose (bias and groups included), the routing the loss is meant to
    balance. The report leaves this open ([V3] Eq. 18).
    """
    B, T, n_experts = scores.shape
    chosen = torch.zeros_like(scores).scatter_(-1, indices, 1.0)  # (B, T, N_r)
    f = chosen.sum(dim=1) * n_experts / (top_k * T)  # (B, N_r), no gradient
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, N_r)
    return alpha * (f.detach() * p).sum(dim=-1).mean()


class Gate(nn.Module):
    """The router: sigmoid affinities, bias-based group-limited top-K selection, gates."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.n_activated_experts
        self.n_groups = args.n_expert_groups
        self.topk_groups = args.n_limited_groups
        self.route_scale = args.route_scale
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        self.balancer = BiasBalancer(args.n_routed_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route tokens.

        Args:
            x: (N, dim) tokens.

        Returns:
            gates (N, K) in x's dtype, indices (N, K), unbiased scores (N, N_r) in fp32.
            The logits, sigmoid and selection run in fp32 even under a bf16 autocast:
            the gating stays in high precision ([V3] §3.3.1).
        """
        with torch.autocast(x.device.type, enabled=False):  # fp32 even under autocast
            scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # (N, N_r)
        selection = scores + self.balancer.bias  # the bias only chooses
        if self.n_groups > 1:
            grouped = selection.unflatten(-1, (self.n_groups, -1))  # (N, G, N_r / G)
            k = min(2, grouped.shape[-1])
            group_scores = grouped.topk(k, dim=-1).values.sum(dim=-1)  # (N, G)
            kept = group_scores.topk(self.topk_groups, dim=-1).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)
            selection = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        indices = selection.topk(self.top_k, dim=-1).indices  # (N, K)
        gates = scores.gather(1, indices)  # unbiased scores of the chosen experts
        gates = gates / gates.sum(dim=-1, keepdim=True) * self.route_scale
        return gates.to(x.dtype), indices, scores


class GroupedExperts(nn.Module):
    """The routed experts of one MoE layer, stored stacked: ``w1``, ``w3`` (E, I, dim) and
    ``w2`` (E, dim, I), expert e being the SwiGLU MLP w2[e](silu(w1[e] x) * w3[e] x).

    ``impl="grouped"`` runs all experts as three ``torch._grouped_mm`` calls over the
    tokens sorted by expert, with the segment ends computed on the device: no host
    synchronisation and three launches per layer, whatever the number of experts. Where
    ``_grouped_mm`` would synchronise (any dtype but bf16 on a GPU) or cannot be compiled
    (float32), the same experts run as batched matmuls over 128-row segments
    (:func:`expert_path` says which runs where).
    ``impl="loop"`` is the reference: one small matmul per expert after reading the
    counts on the host. With ``fp8=True`` (``ModelArgs.fp8``, or
    :func:`~dsv3lite.model.convert_to_fp8` on a built model) the experts' three GEMMs run
    block-scaled in FP8: on a GPU with FP8 tensor cores as
    one grouped FP8 GEMM each over 128-aligned segments (:mod:`dsv3lite.fp8.grouped`, no
    host sync), elsewhere (and with ``impl="loop"``) expert by expert through
    :func:`~dsv3lite.fp8.fp8_linear`, which gives the same numbers.

    Checkpoints written with one ``nn.Linear`` per expert (``experts.{e}.w1.weight``)
    are stacked on load.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int, impl: str = "grouped",
                 fp8: bool = False):
        super().__init__()
        if impl not in MOE_IMPLS:
            raise ValueError(f"impl={impl!r} is invalid: choose one of {', '.join(MOE_IMPLS)}")
        self.n_experts, self.impl, self.fp8 = n_experts, impl, fp8
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        # nn.Linear's default init, expert by expert: the random stream then advances as
        # it did with one Linear per expert, so a seeded model is the same model as before
        # (Transformer.reset_parameters then draws the real init, in the same order).
        with torch.no_grad():
            for e in range(n_experts):
                for w in (self.w1, self.w2, self.w3):
                    nn.init.kaiming_uniform_(w[e], a=math.sqrt(5))
        self.register_load_state_dict_pre_hook(GroupedExperts._stack_per_expert_keys)

    @staticmethod
    def _stack_per_expert_keys(module: GroupedExperts, state_dict: dict[str, torch.Tensor],
                               prefix: str, *args: Any) -> None:
        if f"{prefix}0.w1.weight" not in state_dict:
            return
        for name in ("w1", "w2", "w3"):
            state_dict[prefix + name] = torch.stack(
                [state_dict.pop(f"{prefix}{e}.{name}.weight") for e in range(module.n_experts)])

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on tokens ``x`` (..., dim)."""
        return F.linear(F.silu(F.linear(x, self.w1[e])) * F.linear(x, self.w3[e]), self.w2[e])

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Outputs for tokens sorted by expert.

        Args:
            x: (N, dim) tokens, expert 0's first, then expert 1's, ...
            counts: (E,) tokens per expert (on x's device).
        """
        device_type = x.device.type
        dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                 else x.dtype)
        path = expert_path(self.impl, self.fp8, x.device, dtype, fp8_kernels=use_triton(x),
                           compiling=torch.compiler.is_compiling())
        if path == "fp8_grouped":
            return grouped_fp8_experts(x, counts, self.w1, self.w2, self.w3)
        if path == "loop":
            return self._loop(x, counts)
        x = x.to(dtype)
        w1, w2, w3 = (w.to(dtype) for w in (self.w1, self.w2, self.w3))
        if path == "segments":
            return self._segments(x, counts, w1, w2, w3)
        ends = counts.cumsum(0).to(torch.int32)
        h = F.silu(torch._grouped_mm(x, w1.transpose(-2, -1), offs=ends)) \
            * torch._grouped_mm(x, w3.transpose(-2, -1), offs=ends)
        return torch._grouped_mm(h, w2.transpose(-2, -1), offs=ends)

    def _segments(self, x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor,
                  w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
        """The experts as batched matmuls over 128-row segments: no host sync, x's dtype.

        The tokens are copied into segments that start at multiples of 128
        (:func:`~dsv3lite.fp8.segments.pad_segments`, shapes from N and E only), each
        128-row segment gets a copy of its expert's weights (``index_select``), and one
        ``bmm`` per GEMM does the rest; zero padding rows stay zero through the SwiGLU.
        Each token's output is its expert's MLP, as in ``_grouped_mm``, summed in
        another order. The price: up to 127 padding rows per expert and the gathered
        weights, (N/128 + E) copies of each expert matrix, fine for decoding and small
        models, heavy for training a large one in fp32 (use bf16 autocast there).
        """
        x_padded, ends, index = pad_segments(x, counts)  # (S·128, dim), (E,), (N,)
        starts = torch.arange(0, x_padded.shape[0], ALIGN, device=x.device)  # (S,)
        expert = torch.searchsorted(ends, starts, right=True).clamp_(max=self.n_experts - 1)
        xs = x_padded.unflatten(0, (-1, ALIGN))  # (S, 128, dim)
        w1, w2, w3 = (w.index_select(0, expert) for w in (w1, w2, w3))  # (S, ., .)
        h = F.silu(torch.bmm(xs, w1.transpose(1, 2))) * torch.bmm(xs, w3.transpose(1, 2))
        return unpad(torch.bmm(h, w2.transpose(1, 2)).flatten(0, 1), index)

    def _loop(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        linear = fp8_linear if self.fp8 else F.linear
        outs = []
        for e, chunk in enumerate(x.split(counts.tolist())):  # host sync: the reference
            if len(chunk):
                chunk = linear(F.silu(linear(chunk, self.w1[e])) * linear(chunk, self.w3[e]),
                               self.w2[e])
            outs.append(chunk)
        return torch.cat(outs)


class MoE(nn.Module):
    """Shared experts plus routed experts (Eq. 12 without the residual).

    ``moe(x)`` returns ``(out, stats)``: the FFN output and the :class:`RoutingStats` of
    the pass. The layer stores nothing about the pass.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_routed_experts = args.n_routed_experts
        self.top_k = args.n_activated_experts
        self.alpha = args.balance_loss_alpha
        self.gate = Gate(args)
        self.experts = GroupedExperts(args.n_routed_experts, args.dim, args.moe_inter_dim,
                                      args.moe_impl, args.fp8)
        self.shared_experts = (MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, args.fp8)
                               if args.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingStats]:
        """Route and run the experts.

        Args:
            x: (B, T, dim) tokens.

        Returns:
            ``(out, stats)``: out (B, T, dim); stats the expert counts of this pass and,
            in training mode, its sequence-wise balance loss ([V3] Eqs. 17-20).
        """
        B, T, dim = x.shape
        flat = x.reshape(-1, dim)  # (N, dim)
        gates, indices, scores = self.gate(flat)
        chosen = indices.flatten()  # (N·K,)
        counts = torch.zeros(self.n_routed_experts, dtype=torch.long, device=x.device) \
            .scatter_add_(0, chosen, torch.ones_like(chosen))  # no host sync, unlike bincount
        balance_loss = (sequence_balance_loss(scores.view(B, T, -1), indices.view(B, T, -1),
                                              self.top_k, self.alpha)
                        if self.training else None)
        # Dispatch: sort the (token, slot) pairs by expert so each expert runs once on a
        # contiguous slice; then scatter-add the gated outputs back to their tokens.
        order = chosen.argsort(stable=True)
        token_of = order // self.top_k
        routed_out = self.experts(flat[token_of], counts)
        weighted = routed_out * gates.flatten()[order].unsqueeze(-1).to(routed_out.dtype)
        out = torch.zeros_like(flat, dtype=weighted.dtype).index_add_(0, token_of, weighted)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(B, T, dim), RoutingStats(counts, balance_loss)
