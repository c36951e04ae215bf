"""Run one training step of a dsv3lite model as a real pipeline: one process per rank.

The model is cut into stages: the embedding and the first blocks; middle blocks; the
last blocks, the final norm, the head, the MTP modules and the loss. Each rank is a
process; activations and gradients travel between them with ``torch.distributed``
point-to-point messages on the gloo backend (CPU), and every rank runs the op list that
:func:`~dsv3lite.pipeline.build_schedule` gives it.

**The trace records what ran, not what was asked.** Every message starts with a small
header naming the micro-batch and the stage that produced it. A forward records the
stage module it called and the micro-batch named by the activation it received; a
backward the micro-batch named by the gradient it received (or whose loss it
differentiated); a W the label of the group of weight-gradient closures it actually
popped; a backward whether its Linears really queued their weight gradients. A message
sent to the wrong rank, a W that pops the wrong group or an op that silently does
nothing changes the trace, and :func:`~dsv3lite.pipeline.check` compares it with the
schedule. After the training step every rank runs a forward-only step (no grad) along
the same order, as deepseek-ai/DualPipe's examples do.

What makes it DeepSeek's and not a toy:

- **Zero-bubble W.** Split backwards leave their Linear weight gradients queued in
  :data:`~dsv3lite.pipeline.stages.WEIGHT_GRADS`; a ``W`` op runs the oldest group.
- **Embedding, head and MTP on one rank.** In DualPipe and DualPipeV the first and the
  last stage share rank 0, so the embedding and the output head, which the MTP module
  reuses, are one set of weights there ([V3] §3.2.3). In 1F1B they sit on the first and
  the last rank, and their gradients are summed across ranks, as any tied embedding is.
- **The balance state.** The routing stats of the MoE layers (sequence-wise balance
  losses and expert counts) travel down the pipeline beside the hidden state, as
  values; the last stage returns every layer's counts with the loss. After the step the
  counts are summed over micro-batches and ranks (all-reduce) before the bias update,
  so every copy of the bias moves exactly as in one process.
- **DualPipe's two copies.** Each DualPipe rank holds two stages, each stage lives on
  two ranks, and the gradients of the two copies are summed (all-reduce) after the step.

On a CPU this proves that the schedule computes the same step as one process; it
cannot show the overlap's speed: an FB pair runs its forward, then its backward.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Optional, Sequence, cast

import torch
import torch.distributed as dist

from ..model import Transformer
from ..moe import MoE
from .processes import run_ranks
from .schedules import Op, Schedule
from .simulate import Event, Timeline
from .stages import WEIGHT_GRADS, PipelineStage, build_stages, make_weight_grads_deferrable, \
    split_layers

__all__ = ["Executed", "PipelineResult", "run_pipeline"]


@dataclass(frozen=True)
class Executed:
    """One F, B or W as a rank actually ran it.

    Attributes:
        kind: ``"F"``, ``"B"`` or ``"W"``.

        stage: The stage module that ran (F, B) or that the popped closures belong to (W).

        batch: The micro-batch it computed on: for F, the one named by the activation it
            received (the token micro-batch on the first stage); for B, the one named by
            the gradient it received (its own loss on the last stage); for W, the label
            of the group of weight gradients it popped.

        deferred: For B: its Linears queued weight gradients for a later W.

        start, end: Seconds from the step's start (``time.perf_counter`` on the rank).
    """

    kind: str
    stage: int
    batch: int
    deferred: bool = False
    start: float = 0.0
    end: float = 0.0

    def key(self) -> str:
        """The same form as :meth:`~dsv3lite.pipeline.Op.key` (``F:s2:m5``, ...)."""
        return f"{self.kind}:s{self.stage}:m{self.batch}" + (":zb" if self.deferred else "")


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` returns.

    Attributes:
        losses: For each micro-batch (step order), its loss parts (main, mtp, balance, total);
            None for one whose loss no rank recorded (a faulty run).

        grads: Every parameter's gradient, summed over ranks (mirrored copies included).

        biases: Every MoE layer's balancing bias after the step's bias update.

        counts: Every MoE layer's expert counts over the step, summed over ranks.

        trace: Per rank, the F, B and W parts it ran, in the order it ran them.

        orders: Per rank, the op strings the schedule asked for.

        forward_only_losses: The loss parts of the forward-only step (None: not run).

        forward_only_trace: Per rank, the forwards of that step.

        weight_grads_per_w: Per rank, how many Linear weight gradients each W op ran.

        weight_grads_left: Per rank, groups of deferred weight gradients no W ran.
    """

    losses: list[Optional[dict[str, torch.Tensor]]]
    grads: dict[str, torch.Tensor]
    biases: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]
    trace: list[list[Executed]]
    orders: list[list[str]]
    schedule: Optional[Schedule] = None
    wall_s: float = 0.0
    forward_only_losses: Optional[list[Optional[dict[str, torch.Tensor]]]] = None
    forward_only_trace: list[list[Executed]] = field(default_factory=list)
    weight_grads_per_w: list[list[int]] = field(default_factory=list)
    weight_grads_left: list[int] = field(default_factory=list)

    def trace_keys(self, forward_only: bool = False) -> list[list[str]]:
        """Per rank, the recorded parts as :meth:`Executed.key` strings."""
        trace = self.forward_only_trace if forward_only else self.trace
        return [[e.key() for e in rank] for rank in trace]

    def timeline(self) -> Timeline:
        """The recorded trace as a :class:`~dsv3lite.pipeline.Timeline` (seconds), for
        :func:`~dsv3lite.plot.plot_timeline`: each op of the schedule spans the parts
        recorded for it.

        Raises:
            ValueError: if the recorded parts are not the schedule's, or no schedule was
                recorded.
        """
        schedule = self.schedule
        if schedule is None:
            raise ValueError("this result records no schedule: no timeline")
        for rank in range(schedule.n_ranks):
            if self.trace_keys()[rank] != schedule.part_keys(rank):
                raise ValueError(f"rank {rank} ran other work than its schedule: no timeline")
        events = []
        for r, (order, rank_trace) in enumerate(zip(schedule.orders, self.trace)):
            i = 0
            for op in order:
                n = len(op.parts())
                events.append(Event(r, op, rank_trace[i].start, rank_trace[i + n - 1].end))
                i += n
        makespan = max(e.end for e in events)
        busy = [sum(e.end - e.start for e in t) for t in self.trace]
        return Timeline(schedule, events, makespan, busy, [makespan - b for b in busy],
                        [], schedule.param_copies, {"unit": "seconds"})


def _tag(stage: int, batch: int, n_microbatches: int, grad: bool, index: int,
         step: int, n_stages: int) -> int:
    """A message tag unique to (step, receiving stage, micro-batch, flow, tensor)."""
    return (((step * n_stages + stage) * n_microbatches + batch) * 2 + grad) * 4 + index


class _Worker:
    """One rank's state while it runs its op list."""

    def __init__(self, rank: int, schedule: Schedule, model: Transformer,
                 microbatches: list[tuple[torch.Tensor, torch.Tensor]],
                 progress_path: Optional[str], skip_at: Optional[int] = None) -> None:
        self.rank, self.schedule, self.model = rank, schedule, model
        self.microbatches = microbatches
        self.stages = build_stages(model, schedule, rank)
        B, T = microbatches[0][0].shape
        self.shapes = {s: PipelineStage(model, s, schedule.n_stages).carried_shapes(B, T)
                       for s in range(schedule.n_stages)}
        self.progress_path, self.skip_at = progress_path, skip_at
        self.weight_grads_per_w: list[int] = []
        self.reset(step=0)

    def reset(self, step: int) -> None:
        """Empty the per-step state; ``step`` keeps the two steps' message tags apart."""
        self.step = step
        self.inputs: dict = {}    # (batch, stage) -> input tensors
        self.outputs: dict = {}   # (batch, stage) -> output tensors
        self.handed: dict = {}    # (batch, stage, grad) -> (header, tensors), same rank
        self.losses: dict = {}    # batch -> LossBreakdown
        self.counts: Optional[torch.Tensor] = None  # expert counts of the last stage's batches
        self.sends: list = []
        self.trace: list[Executed] = []

    # -- communication: a header (micro-batch, stage that produced it), then the tensors
    def _recv(self, stage: int, batch: int, src_stage: int, grad: bool
              ) -> tuple[int, list[torch.Tensor]]:
        """Receive for ``stage`` what ``src_stage`` produced for ``batch``; return the
        micro-batch the header names, and the tensors."""
        src = self.schedule.stage_rank(src_stage, batch)
        if src == self.rank:  # same rank (DualPipeV's turn, one rank): hand over locally
            header, tensors = self.handed.pop((batch, stage, grad))
        else:
            tag = lambda i: _tag(stage, batch, self.schedule.n_microbatches, grad, i,  # noqa
                                 self.step, self.schedule.n_stages)
            header = torch.empty(2, dtype=torch.long)
            dist.recv(header, src, tag=tag(0))
            tensors = []
            for i, shape in enumerate(self.shapes[min(stage, src_stage)]):
                t = torch.empty(shape)
                dist.recv(t, src, tag=tag(i + 1))
                tensors.append(t)
        sent_batch, sent_stage = header.tolist()
        if sent_stage != src_stage:
            raise RuntimeError(f"stage {stage} of micro-batch {batch} received from stage "
                               f"{sent_stage}, expected stage {src_stage}")
        return sent_batch, tensors

    def _send(self, tensors: Sequence[torch.Tensor], stage: int, batch: int, dst_stage: int,
              grad: bool) -> None:
        header = torch.tensor([batch, stage])
        tensors = [t.detach().contiguous() for t in tensors]
        dst = self.schedule.stage_rank(dst_stage, batch)
        if dst == self.rank:
            self.handed[(batch, dst_stage, grad)] = (header, tensors)
            return
        for i, t in enumerate([header, *tensors]):
            tag = _tag(dst_stage, batch, self.schedule.n_microbatches, grad, i, self.step,
                       self.schedule.n_stages)
            self.sends.append((dist.isend(t, dst, tag=tag), t))

    # -- compute
    def forward(self, op: Op) -> None:
        s = op.stage
        stage = self.stages[s]
        if stage.is_first:
            b = op.batch
            inputs = [self.microbatches[b][0]]
        else:
            b, inputs = self._recv(s, op.batch, s - 1, grad=False)
            inputs = [t.requires_grad_(torch.is_grad_enabled()) for t in inputs]
        start = time.perf_counter()
        outputs = stage(*inputs)
        if stage.is_last:
            tokens, targets = self.microbatches[b]
            out = stage.criterion(outputs, tokens, targets)
            assert out.expert_counts is not None, "criterion returns the expert counts"
            self.losses[b] = out.loss
            self.counts = (out.expert_counts if self.counts is None
                           else self.counts + out.expert_counts)
        if torch.is_grad_enabled():  # kept for the backward
            self.inputs[(b, s)] = inputs
            if not stage.is_last:
                self.outputs[(b, s)] = outputs
        self.trace.append(Executed("F", stage.index, b, False, start, time.perf_counter()))
        if not stage.is_last:
            self._send(outputs, s, b, s + 1, grad=False)

    def backward(self, op: Op) -> None:
        s = op.stage
        stage = self.stages[s]
        grads: list[torch.Tensor] = []  # from the next stage (the last has its loss)
        if stage.is_last:
            b = op.batch
        else:
            b, grads = self._recv(s, op.batch, s + 1, grad=True)
        start = time.perf_counter()
        WEIGHT_GRADS.enabled = op.split
        try:
            if stage.is_last:
                self.losses[b].total.backward()
            else:
                pairs = [(o, g) for o, g in zip(self.outputs.pop((b, s)), grads)
                         if o.requires_grad]  # the first stage's zero balance has none
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        finally:
            WEIGHT_GRADS.enabled = False
        deferred = WEIGHT_GRADS.pending() > 0
        if op.split:
            WEIGHT_GRADS.flush(label=(b, s))
        self.trace.append(Executed("B", stage.index, b, deferred, start, time.perf_counter()))
        inputs = self.inputs.pop((b, s))
        if not stage.is_first:
            # A balance slot this stage overwrote gets no gradient: send zeros for it.
            self._send([torch.zeros_like(t) if t.grad is None else t.grad for t in inputs],
                       s, b, s - 1, grad=True)

    def weight(self) -> None:
        start = time.perf_counter()
        label, n = WEIGHT_GRADS.pop()
        b, s = cast(tuple[int, int], label)  # backward flushes with label=(b, s)
        self.weight_grads_per_w.append(n)
        self.trace.append(Executed("W", s, b, False, start, time.perf_counter()))

    def run(self, i: int, op: Op, forward_only: bool = False) -> None:
        if self.progress_path:
            with open(self.progress_path, "w") as f:
                f.write(str(op))
        if i == self.skip_at:
            return  # for tests: a bug that believes it ran the op
        for part in op.parts():
            if part.kind == "F":
                self.forward(part)
            elif forward_only:
                continue  # a no-grad step runs the forwards alone, as DualPipe's does
            elif part.kind == "B":
                self.backward(part)
            else:
                self.weight()

    def finish(self) -> None:
        for work, _ in self.sends:
            work.wait()
        self.sends = []


def _worker_main(rank: int, world: int, workdir: str, timeout_s: float) -> None:
    """Entry point of one rank's process (spawned by :func:`run_pipeline`)."""
    err_path = os.path.join(workdir, f"rank{rank}.err")
    try:
        torch.set_num_threads(1)
        plan = torch.load(os.path.join(workdir, "plan.pt"), weights_only=False)
        dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous",
                                rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        fault = plan.get("fault") or {}
        fault = fault if fault.get("rank") == rank else {}
        model = Transformer(plan["args"]).train()
        model.load_state_dict(plan["state"])
        make_weight_grads_deferrable(model)
        WEIGHT_GRADS.reset()
        schedule = plan["schedule"]
        worker = _Worker(rank, schedule, model, plan["microbatches"],
                         os.path.join(workdir, f"rank{rank}.progress"),
                         fault.get("at_op") if fault.get("kind") == "skip" else None)
        dist.barrier()
        t0 = time.perf_counter()
        for i, op in enumerate(schedule.orders[rank]):
            if fault.get("at_op") == i and fault.get("kind") in ("raise", "hang"):
                if fault["kind"] == "hang":
                    time.sleep(10 * timeout_s)
                raise RuntimeError(f"injected fault at op {i} ({op})")
            worker.run(i, op)
        worker.finish()
        trace, losses, step_counts = worker.trace, worker.losses, worker.counts
        # The forward-only step ([DP] examples' inference check), before the bias
        # update, so it sees the weights and biases the training step saw.
        fwd_losses, fwd_trace = None, []
        if plan.get("forward_only"):
            dist.barrier()
            worker.reset(step=1)
            worker.skip_at = None
            with torch.no_grad():
                for i, op in enumerate(schedule.orders[rank]):
                    worker.run(i, op, forward_only=True)
            worker.finish()
            fwd_losses, fwd_trace = worker.losses, worker.trace
        # Sum what lives on several ranks: gradients (DualPipe's two copies, the tied
        # embedding) and the expert counts (on the ranks that hold the last stage), then
        # update the biases everywhere alike.
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            grads[name] = g
        moe_names = [n for n, m in model.named_modules() if isinstance(m, MoE)]
        step_counts = (step_counts.clone() if step_counts is not None else
                       torch.zeros(len(moe_names), model.args.n_routed_experts, dtype=torch.long))
        dist.all_reduce(step_counts)
        counts = dict(zip(moe_names, step_counts))
        model.update_balance_biases(step_counts, plan.get("gamma"))
        biases = {n: m.gate.balancer.bias.clone() for n, m in model.named_modules()
                  if isinstance(m, MoE)}

        def detached(losses):
            return {b: {k: v.detach() for k, v in vars(l).items()} for b, l in losses.items()}

        shift = lambda t: [replace(e, start=e.start - t0, end=e.end - t0) for e in t]  # noqa
        out = {"trace": shift(trace), "losses": detached(losses),
               "forward_only_trace": shift(fwd_trace),
               "forward_only_losses": None if fwd_losses is None else detached(fwd_losses),
               "weight_grads_per_w": worker.weight_grads_per_w,
               "weight_grads_left": len(WEIGHT_GRADS)}
        if rank == 0:
            out.update(grads=grads, biases=biases, counts=counts)
        torch.save(out, os.path.join(workdir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(err_path, "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1)


def run_pipeline(schedule: Schedule, model: Transformer,
                 microbatches: list[tuple[torch.Tensor, torch.Tensor]], *,
                 gamma: Optional[float] = None, timeout_s: float = 120.0,
                 forward_only: bool = True, fault: Optional[dict] = None) -> PipelineResult:
    """Run one training step of ``model`` under ``schedule``, one process per rank, then
    (``forward_only``) a no-grad step of the same micro-batches along the same order.

    Args:
        schedule: From :func:`~dsv3lite.pipeline.build_schedule`.

        model: The model whose weights every rank starts from (it is not modified).

        microbatches: ``schedule.n_microbatches`` (tokens, targets) pairs of one shape.

        gamma: Bias update speed for the step's update (default the model's).

        timeout_s: A rank that waits longer than this for a message fails the run; the
            whole run is stopped after about this long plus start-up.

        forward_only: Also run the forward-only step ([DP] examples' inference check).

        fault: For tests: ``{"rank": r, "at_op": i, "kind": "raise" | "hang" | "skip"}``;
            ``skip`` passes over op ``i`` of the training step as if it had run it.

    Returns:
        A :class:`PipelineResult`.

    Raises:
        ValueError: on a bad argument. RuntimeError: when a rank fails or hangs,
            naming the rank, its last op and its error.
    """
    if len(microbatches) != schedule.n_microbatches:
        raise ValueError(f"microbatches has {len(microbatches)} entries: the schedule has "
                         f"n_microbatches={schedule.n_microbatches}")
    if model.args.fp8:
        raise ValueError("model.args.fp8=True is not supported by the pipeline executor: "
                         "its W deferral wraps plain nn.Linear layers")
    split_layers(model.args.n_layers, schedule.n_stages)  # raises if too few blocks
    world = schedule.n_ranks
    with tempfile.TemporaryDirectory(prefix="dsv3lite-pipeline-") as workdir:
        torch.save({"args": model.args, "state": model.state_dict(), "schedule": schedule,
                    "microbatches": microbatches, "gamma": gamma, "fault": fault,
                    "forward_only": forward_only},
                   os.path.join(workdir, "plan.pt"))
        wall = run_ranks(_worker_main, world, workdir, timeout_s,
                         (world, workdir, timeout_s), label="pipeline")
        outs = [torch.load(os.path.join(workdir, f"rank{r}.pt"), weights_only=False)
                for r in range(world)]

    def gather(key: str) -> list[Optional[dict[str, torch.Tensor]]]:
        losses: dict[int, dict[str, torch.Tensor]] = {}
        for out in outs:
            losses.update(out[key])
        return [losses.get(b) for b in range(schedule.n_microbatches)]

    return PipelineResult(gather("losses"), outs[0]["grads"], outs[0]["biases"],
                          outs[0]["counts"], [out["trace"] for out in outs],
                          schedule.order_strings(), schedule, wall,
                          None if outs[0]["forward_only_losses"] is None
                          else gather("forward_only_losses"),
                          [out["forward_only_trace"] for out in outs],
                          [out["weight_grads_per_w"] for out in outs],
                          [out["weight_grads_left"] for out in outs])
