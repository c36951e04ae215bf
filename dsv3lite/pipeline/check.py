"""Check a pipelined step against one process, as deepseek-ai/DualPipe's examples do.

The same model and micro-batches go through :func:`~dsv3lite.pipeline.run_pipeline` and
through one process (each micro-batch forward and backward in turn). Then, as in
[DP] ``examples/example_dualpipe.py``: every micro-batch's loss must be equal
**bitwise**; every gradient within a cosine difference 1 − 2⟨x,y⟩/(‖x‖²+‖y‖²) below
:data:`GRAD_COS_DIFF_MAX` = 1e-13, the examples' bound (only the order of the sums
differs); and the losses of a forward-only (no-grad) step bitwise equal too. On top of
those: the trace of what every rank actually ran equal to its schedule, and the expert
counts and the balancing biases after the update equal exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from ..config import ModelArgs
from ..model import Transformer
from ..moe import MoE, Gate
from .executor import PipelineResult, run_pipeline
from .schedules import build_schedule

__all__ = ["GRAD_COS_DIFF_MAX", "check_args", "make_model", "make_microbatches",
           "reference_step", "cal_diff", "max_grad_cal_diff", "trace_matches_schedule",
           "CheckReport", "check"]

#: The gradient bound of deepseek-ai/DualPipe's examples: ``cal_diff(p.grad, p_ref.grad)
#: < 1e-13`` for every parameter ([DP] ``examples/example_dualpipe.py``).
GRAD_COS_DIFF_MAX = 1e-13


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


def reference_step(model: Transformer,
                   microbatches: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                   gamma: Optional[float] = None) -> PipelineResult:
    """The same step in one process: each micro-batch forward and backward in turn, then
    the bias update (on a copy of ``model``). Threads are pinned to 1, like the ranks'."""
    model = copy.deepcopy(model).train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses: list[Optional[dict[str, torch.Tensor]]] = []
        step_counts = torch.zeros((), dtype=torch.long)  # + each batch's (n_moe, E) counts
        for tokens, targets in microbatches:
            out = model(tokens, targets)
            out.loss.total.backward()
            losses.append({k: v.detach() for k, v in vars(out.loss).items()})
            step_counts = step_counts + out.expert_counts
    finally:
        torch.set_num_threads(threads)
    counts = dict(zip([n for n, m in model.named_modules() if isinstance(m, MoE)], step_counts))
    model.update_balance_biases(step_counts, gamma)
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


def max_grad_cal_diff(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
                      ) -> tuple[float, str]:
    """The largest :func:`cal_diff` over the parameters, and that parameter's name.

    Raises:
        ValueError: if the two do not name the same parameters.
    """
    if grads.keys() != reference.keys():
        raise ValueError(f"grads name other parameters than the reference: "
                         f"{sorted(grads.keys() ^ reference.keys())}")
    return max((cal_diff(grads[n], g), n) for n, g in reference.items())


def _losses_equal(got: Optional[list], want: list) -> bool:
    return got is not None and len(got) == len(want) and all(
        p is not None and all(torch.equal(p[k], r[k]) for k in r) for p, r in zip(got, want))


@dataclass
class CheckReport:
    """The checks of deepseek-ai/DualPipe's examples, against one process."""

    schedule: str
    ranks: int
    microbatches: int
    losses_bitwise_equal: bool
    max_grad_cal_diff: float
    forward_only_losses_bitwise_equal: bool
    trace_matches_schedule: bool
    biases_equal: bool
    counts_equal: bool
    wall_s: float
    pipeline: Optional[PipelineResult] = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """Whether every check passed: losses and forward-only losses bitwise equal,
        gradients within :data:`GRAD_COS_DIFF_MAX`, the trace the schedule's, biases and
        counts equal."""
        return (self.losses_bitwise_equal and self.max_grad_cal_diff < GRAD_COS_DIFF_MAX
                and self.forward_only_losses_bitwise_equal and self.trace_matches_schedule
                and self.biases_equal and self.counts_equal)

    def as_dict(self) -> dict[str, object]:
        """The report as a JSON-ready dict (the CLI prints it): every field but
        ``pipeline``, plus ``"ok"``."""
        keys = ("schedule", "ranks", "microbatches", "losses_bitwise_equal",
                "max_grad_cal_diff", "forward_only_losses_bitwise_equal",
                "trace_matches_schedule", "biases_equal", "counts_equal", "wall_s")
        return {k: getattr(self, k) for k in keys} | {"ok": self.ok}


def trace_matches_schedule(result: PipelineResult) -> bool:
    """Every rank ran exactly its schedule's F, B and W parts, in order, on the
    micro-batches and stages the schedule names (and, if a forward-only step ran, its
    forwards in the same order), and left no deferred weight gradient unrun.

    Raises:
        ValueError: if ``result`` has no schedule (a :func:`reference_step` result).
    """
    s = result.schedule
    if s is None:
        raise ValueError("result records no schedule (run_pipeline's results do)")
    ranks = range(s.n_ranks)
    train = result.trace_keys() == [s.part_keys(r) for r in ranks]
    forward = (result.forward_only_losses is None
               or result.trace_keys(forward_only=True) == [s.part_keys(r, True) for r in ranks])
    return train and forward and not any(result.weight_grads_left)


def check(name: str, n_ranks: int, n_microbatches: int, *, args: Optional[ModelArgs] = None,
          batch_size: int = 2, seq_len: int = 16, seed: int = 0,
          timeout_s: float = 120.0, fault: Optional[dict] = None) -> CheckReport:
    """Run the pipelined step (and its forward-only step) and the single-process step on
    the same micro-batches and compare: every micro-batch's loss bitwise, every
    gradient's cosine difference, the forward-only losses bitwise, the recorded trace
    against the schedule, the expert counts and the biases after the update.
    ``fault`` goes to :func:`run_pipeline` (tests)."""
    schedule = build_schedule(name, n_ranks, n_microbatches)
    args = args or check_args(schedule.n_stages, 0)
    model = make_model(args, seed)
    microbatches = make_microbatches(args, n_microbatches, batch_size, seq_len, seed)
    result = run_pipeline(schedule, model, microbatches, timeout_s=timeout_s, fault=fault)
    ref = reference_step(model, microbatches)
    diff, _ = max_grad_cal_diff(result.grads, ref.grads)
    biases_equal = all(torch.equal(result.biases[n], b) for n, b in ref.biases.items())
    counts_equal = all(torch.equal(result.counts[n], c) for n, c in ref.counts.items())
    return CheckReport(name, n_ranks, n_microbatches, _losses_equal(result.losses, ref.losses),
                       diff, _losses_equal(result.forward_only_losses, ref.losses),
                       trace_matches_schedule(result), biases_equal, counts_equal,
                       result.wall_s, result)
