"""Check a pipelined step against one process, as deepseek-ai/DualPipe's examples do.

The same model and micro-batches go through :func:`~dsv3lite.pipeline.run_pipeline` and
through one process (each micro-batch forward and backward in turn). Then every
micro-batch's loss must be equal **bitwise**, every gradient within a cosine difference
1 − 2⟨x,y⟩/(‖x‖²+‖y‖²) < 1e-12 (only the order of the sums differs), the rank traces
equal to the schedule's op lists, and the expert counts and the balancing biases after
the update equal exactly (deepseek-ai/DualPipe ``examples/``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..config import ModelArgs
from ..model import Transformer
from ..moe import MoE, Gate
from .executor import PipelineResult, run_pipeline
from .schedules import build_schedule

__all__ = ["check_args", "make_model", "make_microbatches", "reference_step", "cal_diff",
           "CheckReport", "check"]


def check_args(n_stages: int, n_layers: int) -> ModelArgs:
    """The model :func:`check` uses by default: the tiny preset with one block per stage,
    one dense block, MTP depth 1, and weights of unit gain (N(0, 1/fan_in)) so that
    routing and attention are far from uniform."""
    return ModelArgs.tiny(n_layers=max(n_layers, n_stages), n_dense_layers=1, n_mtp_depth=1)


def _unit_gain_(model: Transformer) -> None:
    """Linears and routers N(0, 1/fan_in), embeddings N(0, 1)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, Gate)):
                module.weight.normal_(0.0, module.weight.shape[1] ** -0.5)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0)


def make_model(args: ModelArgs, seed: int = 0) -> Transformer:
    """A model with unit-gain weights, built identically in every process."""
    torch.manual_seed(seed)
    model = Transformer(args)
    _unit_gain_(model)
    return model.train()


def make_microbatches(args: ModelArgs, n_microbatches: int, batch_size: int = 2,
                      seq_len: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random (tokens, targets) micro-batches, the targets the tokens shifted by one."""
    g = torch.Generator().manual_seed(seed + 1)
    data = torch.randint(0, args.vocab_size, (n_microbatches, batch_size, seq_len + 1),
                         generator=g)
    return [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]


def reference_step(model: Transformer, microbatches, *, gamma: Optional[float] = None
                   ) -> PipelineResult:
    """The same step in one process: each micro-batch forward and backward in turn, then
    the bias update (on a copy of ``model``). Threads are pinned to 1, like the ranks'."""
    model = copy.deepcopy(model).train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = []
        for tokens, targets in microbatches:
            loss = model(tokens, targets).loss
            loss.total.backward()
            losses.append({k: v.detach() for k, v in vars(loss).items()})
    finally:
        torch.set_num_threads(threads)
    counts = {n: m.gate.balancer.counts.clone() for n, m in model.named_modules()
              if isinstance(m, MoE)}
    model.update_balance_biases(gamma)
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
             for n, p in model.named_parameters()}
    biases = {n: m.gate.balancer.bias.clone() for n, m in model.named_modules()
              if isinstance(m, MoE)}
    return PipelineResult(losses, grads, biases, counts, [], [])


def cal_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 − 2⟨x,y⟩ / (‖x‖² + ‖y‖²) in float64: 0 when equal (DualPipe's examples' metric)."""
    x, y = x.double(), y.double()
    denominator = float((x * x + y * y).sum())
    return 0.0 if denominator == 0 else 1.0 - 2.0 * float((x * y).sum()) / denominator


@dataclass
class CheckReport:
    """The checks of deepseek-ai/DualPipe's examples, against one process."""

    schedule: str
    ranks: int
    microbatches: int
    losses_bitwise_equal: bool
    max_grad_cal_diff: float
    trace_matches_schedule: bool
    biases_equal: bool
    counts_equal: bool
    wall_s: float
    pipeline: Optional[PipelineResult] = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return (self.losses_bitwise_equal and self.max_grad_cal_diff < 1e-12
                and self.trace_matches_schedule and self.biases_equal and self.counts_equal)

    def as_dict(self) -> dict:
        keys = ("schedule", "ranks", "microbatches", "losses_bitwise_equal",
                "max_grad_cal_diff", "trace_matches_schedule", "biases_equal",
                "counts_equal", "wall_s")
        return {k: getattr(self, k) for k in keys} | {"ok": self.ok}


def check(name: str, n_ranks: int, n_microbatches: int, *, args: Optional[ModelArgs] = None,
          batch_size: int = 2, seq_len: int = 16, seed: int = 0,
          timeout_s: float = 120.0) -> CheckReport:
    """Run the pipelined step and the single-process step on the same micro-batches and
    compare: every micro-batch's loss bitwise, every gradient's cosine difference, the
    trace against the schedule, the expert counts and the biases after the update."""
    schedule = build_schedule(name, n_ranks, n_microbatches)
    args = args or check_args(schedule.n_stages, 0)
    model = make_model(args, seed)
    microbatches = make_microbatches(args, n_microbatches, batch_size, seq_len, seed)
    result = run_pipeline(schedule, model, microbatches, timeout_s=timeout_s)
    ref = reference_step(model, microbatches)
    losses_equal = all(torch.equal(p[k], r[k]) for p, r in zip(result.losses, ref.losses)
                       for k in r)
    diff = max(cal_diff(result.grads[n], g) for n, g in ref.grads.items())
    trace_ok = [[t[0] for t in rank] for rank in result.trace] == result.orders
    biases_equal = all(torch.equal(result.biases[n], b) for n, b in ref.biases.items())
    counts_equal = all(torch.equal(result.counts[n], c) for n, c in ref.counts.items())
    return CheckReport(name, n_ranks, n_microbatches, losses_equal, diff, trace_ok,
                       biases_equal, counts_equal, result.wall_s, result)
