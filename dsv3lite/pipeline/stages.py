"""A dsv3lite model cut into pipeline stages, and weight gradients that can wait.

:class:`PipelineStage` is stage ``index`` of a :class:`~dsv3lite.Transformer`: the
embedding and the first blocks; middle blocks; or the last blocks, the final norm, the
head, the MTP modules and the loss. It holds references to the model's own modules, so
two stages on one rank share the embedding and the head, as [V3] §3.2.3 places them.

Zero-bubble schedules split a backward into B (input gradients, which the previous
stage waits for) and W (weight gradients, which nobody waits for) ([ZB], Qi et al.
2023). :func:`make_weight_grads_deferrable` routes every Linear through
``_LinearFunction``, whose backward returns the input gradient at once and, while
:data:`WEIGHT_GRADS` is enabled, queues the weight-gradient GEMM as a closure; a ``W``
op runs the oldest queued group (FIFO), as deepseek-ai/DualPipe's ``WeightGradStore``
does. The other weights get their gradients during B: the norm gains, the router and
the embedding, which are small, and the routed experts, whose stacked weights run as
grouped GEMMs (deferring those too would need a grouped weight-gradient closure).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..model import ModelOutput, Transformer
from ..moe import MoE, RoutingStats
from .schedules import Schedule

__all__ = ["WEIGHT_GRADS", "WeightGradStore", "make_weight_grads_deferrable", "split_layers",
           "PipelineStage", "build_stages"]


# ------------------------------------------------------------ deferred weight gradients
class WeightGradStore:
    """Closures computing weight gradients, queued so a later ``W`` op can run them.

    While ``enabled``, a Linear's backward puts its weight-gradient closure here; at the
    end of a split backward :meth:`flush` closes the group under a label (the
    micro-batch and stage it came from); :meth:`pop` runs the oldest group (the
    schedules' W ops are FIFO) and says which it was.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Disable the store and drop every queued closure and group (a fresh store)."""
        self.enabled = False
        self._open: list[Callable[[], None]] = []
        self._groups: list[tuple[object, list[Callable[[], None]]]] = []

    def put(self, fn: Callable[[], None]) -> None:
        """Queue ``fn``, a closure that computes one weight gradient when called, in the
        open group."""
        self._open.append(fn)

    def pending(self) -> int:
        """Closures put since the last :meth:`flush`."""
        return len(self._open)

    def flush(self, label: object = None) -> None:
        """Close the open group (possibly empty) under ``label``, e.g. the micro-batch
        and stage of the split backward that filled it; :meth:`pop` returns the label."""
        self._groups.append((label, self._open))
        self._open = []

    def pop(self) -> tuple[object, int]:
        """Run the oldest group; return its label and how many weight gradients it
        computed."""
        if not self._groups:
            raise RuntimeError("a W op found no deferred weight gradient: the schedule "
                               "runs W before its split B")
        label, group = self._groups.pop(0)
        for fn in group:
            fn()
        return label, len(group)

    def __len__(self) -> int:
        return len(self._groups)


#: The process-wide store into which deferrable Linears put their weight-gradient
#: closures while it is ``enabled`` (the executor enables it for split backwards).
WEIGHT_GRADS = WeightGradStore()


class _LinearFunction(torch.autograd.Function):
    """y = x Wᵀ whose backward can defer dW = dyᵀ x to a later W op."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, weight = ctx.saved_tensors

        def weight_grad() -> None:
            with torch.no_grad():  # a deferred W runs outside the backward pass
                dw = grad_out.flatten(0, -2).t() @ x.flatten(0, -2)
                weight.grad = dw if weight.grad is None else weight.grad + dw

        if WEIGHT_GRADS.enabled:
            WEIGHT_GRADS.put(weight_grad)
        else:
            weight_grad()
        return grad_out @ weight, None


def _deferrable_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _LinearFunction.apply(x, self.weight)


def make_weight_grads_deferrable(model: nn.Module) -> int:
    """Route every bias-free ``nn.Linear`` of ``model`` through the deferrable function.

    The forward computes the same ``F.linear`` as before, bit for bit. Returns the
    number of Linears changed.
    """
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.bias is None:
            module.forward = _deferrable_forward.__get__(module)
            n += 1
    return n


# ------------------------------------------------------------------------ the stages
def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous blocks per stage, as even as possible (extra blocks go to early stages)."""
    if n_layers < n_stages:
        raise ValueError(f"n_layers={n_layers} is invalid: a pipeline of {n_stages} stages "
                         f"needs at least one block per stage (n_layers >= {n_stages})")
    base, extra = divmod(n_layers, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [range(bounds[s], bounds[s + 1]) for s in range(n_stages)]


class PipelineStage(nn.Module):
    """Stage ``index`` of ``n_stages`` of a :class:`~dsv3lite.Transformer`.

    It holds references to the model's own modules (no copy), so two stages on one rank
    share the embedding and the head when both need them. Input: the token ids (first
    stage) or the carried tensors; output: the carried tensors, ``(h,)`` or
    ``(h, balance, counts)``: the routing stats of the main MoE layers travel down the
    pipeline as values beside the hidden state. ``balance`` (n_moe,) holds the
    sequence-wise balance loss of each main MoE layer so far, ``counts`` (n_moe,
    n_routed_experts) its expert counts (as floats, without gradient); rows of layers
    not reached yet are zero. The last stage's :meth:`criterion` turns them into the
    loss parts and the expert counts of the whole model.
    """

    def __init__(self, model: Transformer, index: int, n_stages: int):
        super().__init__()
        self.model_ref = [model]  # a list, so the model is not registered twice
        self.index, self.n_stages = index, n_stages
        self.layer_ids = split_layers(model.args.n_layers, n_stages)[index]
        self.layers = nn.ModuleList(model.layers[i] for i in self.layer_ids)
        self.is_first, self.is_last = index == 0, index == n_stages - 1
        if self.is_first or (self.is_last and len(model.mtp)):
            # the last stage's MTP modules embed tokens too: registering the embedding
            # there lets a schedule that computes weight gradients per stage's
            # parameters (torch's ScheduleDualPipeV) reach it from the MTP loss
            self.embed = model.embed
        if self.is_last:
            self.norm, self.head, self.mtp = model.norm, model.head, model.mtp
        moe_ids = [i for i in range(model.args.n_layers) if isinstance(model.layers[i].ffn, MoE)]
        self.n_moe = len(moe_ids)
        self.moe_slots = [(moe_ids.index(i), model.layers[i].ffn) for i in self.layer_ids
                          if i in moe_ids]

    def carried_shapes(self, batch: int, seq_len: int) -> list[tuple[int, ...]]:
        """Shapes of the tensors this stage sends on (and receives gradients for)."""
        args = self.model_ref[0].args
        shapes: list[tuple[int, ...]] = [(batch, seq_len, args.dim)]
        return shapes + [(self.n_moe,), (self.n_moe, args.n_routed_experts)] if self.n_moe \
            else shapes

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run this stage's part of the model on one micro-batch.

        Args:
            inputs: The first stage: ``(tokens,)``, (B, T) token ids. The others: what
                the previous stage returned, ``(h,)`` or ``(h, balance, counts)``.

        Returns:
            ``(h,)``, h (B, T, dim) the hidden state after this stage's blocks, or, when
            the model has MoE layers, ``(h, balance, counts)`` with this stage's MoE
            layers' rows filled in (see the class docstring).
        """
        model = self.model_ref[0]
        if self.is_first:
            (tokens,) = inputs
            h = self.embed(tokens)
            balance = h.new_zeros(self.n_moe) if self.n_moe else None
            counts = h.new_zeros(self.n_moe, model.args.n_routed_experts) if self.n_moe else None
        else:
            h = inputs[0]
            balance, counts = (inputs[1], inputs[2]) if self.n_moe else (None, None)
        T = h.shape[1]
        cos, sin = model.rope_cos[:T], model.rope_sin[:T]
        routing = []
        for layer in self.layers:
            h, stats = layer(h, cos, sin)
            if stats is not None:
                routing.append(stats)
        if self.moe_slots:  # this stage's MoE layers fill their slots
            assert counts is not None and balance is not None  # carried when n_moe > 0
            counts_rows = list(counts.unbind())
            balance_slots = list(balance.unbind())
            for (slot, _), stats in zip(self.moe_slots, routing):
                counts_rows[slot] = stats.counts.to(counts.dtype)
                if stats.balance_loss is not None:
                    balance_slots[slot] = stats.balance_loss
            counts = torch.stack(counts_rows).detach()  # counts never need a gradient
            if model.training:
                balance = torch.stack(balance_slots)
        return (h,) if balance is None or counts is None else (h, balance, counts)

    def criterion(self, outputs: tuple[torch.Tensor, ...], tokens: torch.Tensor,
                  targets: torch.Tensor) -> ModelOutput:
        """The last stage's loss and expert counts, as ``Transformer.forward`` returns
        them (``.loss`` the loss parts, ``.expert_counts`` every MoE layer's, MTP too)."""
        if not self.is_last:
            raise RuntimeError(f"stage {self.index} is not the last stage: it has no loss")
        model = self.model_ref[0]
        h = outputs[0]
        routing = []
        if self.n_moe:
            balances = outputs[1].unbind() if model.training else [None] * self.n_moe
            routing = [RoutingStats(c.long(), b) for c, b in zip(outputs[2].unbind(), balances)]
        logits = self.head(self.norm(h))
        loss, routing = model.loss_parts(tokens, targets, logits, h, routing)
        return ModelOutput(logits=logits, loss=loss, hidden=h,
                           expert_counts=model.stack_counts(routing))


def build_stages(model: Transformer, schedule: Schedule, rank: int) -> dict[int, PipelineStage]:
    """The stage modules ``rank`` runs under ``schedule``, keyed by stage index."""
    return {s: PipelineStage(model, s, schedule.n_stages) for s in schedule.stages_of(rank)}
