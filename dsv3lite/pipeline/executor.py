"""Run one training step of a dsv3lite model as a real pipeline: one process per rank.

The model is cut into stages: the embedding and the first blocks; middle blocks; the
last blocks, the final norm, the head, the MTP modules and the loss. Each rank is a
process; activations and gradients travel between them with ``torch.distributed``
point-to-point messages on the gloo backend (CPU), and every rank runs exactly the op
list that :func:`~dsv3lite.pipeline.build_schedule` gives it, recording a trace.

What makes it DeepSeek's and not a toy:

- **Zero-bubble W.** Split backwards leave their Linear weight gradients queued in
  :data:`~dsv3lite.pipeline.stages.WEIGHT_GRADS`; a ``W`` op runs the oldest group.
- **Embedding, head and MTP on one rank.** In DualPipe and DualPipeV the first and the
  last stage share rank 0, so the embedding and the output head, which the MTP module
  reuses, are one set of weights there ([V3] §3.2.3). In 1F1B they sit on the first and
  the last rank, and their gradients are summed across ranks, as any tied embedding is.
- **The balance state.** Each MoE layer counts its tokens on whichever rank runs it;
  after the step the counts are summed over ranks (all-reduce) before the bias update,
  so every copy of the bias moves exactly as in one process. The sequence-wise balance
  losses of the MoE layers travel down the pipeline beside the hidden state.
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
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from ..model import Transformer
from ..moe import MoE
from .schedules import Op, Schedule
from .stages import WEIGHT_GRADS, PipelineStage, build_stages, make_weight_grads_deferrable, \
    split_layers

__all__ = ["PipelineResult", "run_pipeline", "run_ranks"]


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` returns.

    Attributes:
        losses: For each micro-batch (step order), its loss parts (main, mtp, balance, total).
        grads: Every parameter's gradient, summed over ranks (mirrored copies included).
        biases: Every MoE layer's balancing bias after the step's bias update.
        counts: Every MoE layer's expert counts over the step, summed over ranks.
        trace: Per rank, (op string, start, end) in seconds from the step's start.
        orders: Per rank, the op strings the schedule asked for.
        weight_grads_per_w: Per rank, how many Linear weight gradients each W op ran.
    """

    losses: list[dict[str, torch.Tensor]]
    grads: dict[str, torch.Tensor]
    biases: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]
    trace: list[list[tuple[str, float, float]]]
    orders: list[list[str]]
    schedule: Optional[Schedule] = None
    wall_s: float = 0.0
    weight_grads_per_w: list[list[int]] = field(default_factory=list)

    def timeline(self):
        """The recorded trace as a :class:`~dsv3lite.pipeline.Timeline` (seconds), for
        :func:`~dsv3lite.plot.plot_timeline`."""
        from .simulate import Event, Timeline

        events = [Event(r, op, start, end)
                  for r, (order, rank_trace) in enumerate(zip(self.schedule.orders, self.trace))
                  for op, (_, start, end) in zip(order, rank_trace)]
        makespan = max(e.end for e in events)
        busy = [sum(end - start for _, start, end in t) for t in self.trace]
        return Timeline(self.schedule, events, makespan, busy, [makespan - b for b in busy],
                        [], self.schedule.param_copies, {"unit": "seconds"})


def _tag(stage: int, batch: int, n_microbatches: int, grad: bool, index: int) -> int:
    """A message tag unique to (receiving stage, micro-batch, direction of flow, tensor)."""
    return ((stage * n_microbatches + batch) * 2 + grad) * 4 + index


class _Worker:
    """One rank's state while it runs its op list."""

    def __init__(self, rank: int, schedule: Schedule, model: Transformer,
                 microbatches, progress_path: Optional[str]):
        self.rank, self.schedule, self.model = rank, schedule, model
        self.microbatches = microbatches
        self.stages = build_stages(model, schedule, rank)
        B, T = microbatches[0][0].shape
        self.shapes = {s: PipelineStage(model, s, schedule.n_stages).carried_shapes(B, T)
                       for s in range(schedule.n_stages)}
        self.inputs: dict = {}    # (batch, stage) -> input tensors
        self.outputs: dict = {}   # (batch, stage) -> output tensors
        self.grads_in: dict = {}  # (batch, stage) -> gradients of its inputs (local hand-over)
        self.losses: dict = {}    # batch -> LossBreakdown
        self.sends: list = []
        self.trace: list[tuple[str, float, float]] = []
        self.weight_grads_per_w: list[int] = []
        self.progress_path = progress_path

    # -- communication
    def _recv(self, stage: int, batch: int, src_stage: int, grad: bool) -> list[torch.Tensor]:
        src = self.schedule.stage_rank(src_stage, batch)
        shapes = self.shapes[min(stage, src_stage)]
        if src == self.rank:  # same rank (DualPipeV's turn, one rank): hand over locally
            if grad:
                return self.grads_in.pop((batch, src_stage))
            return [t.detach() for t in self.outputs[(batch, src_stage)]]
        out = []
        for i, shape in enumerate(shapes):
            t = torch.empty(shape)
            dist.recv(t, src, tag=_tag(stage, batch, self.schedule.n_microbatches, grad, i))
            out.append(t)
        return out

    def _send(self, tensors, stage: int, batch: int, dst_stage: int, grad: bool) -> None:
        dst = self.schedule.stage_rank(dst_stage, batch)
        if dst == self.rank:
            if grad:
                self.grads_in[(batch, stage)] = tensors
            return
        for i, t in enumerate(tensors):
            t = t.detach().contiguous()
            tag = _tag(dst_stage, batch, self.schedule.n_microbatches, grad, i)
            self.sends.append((dist.isend(t, dst, tag=tag), t))

    # -- compute
    def forward(self, op: Op) -> None:
        s, b = op.stage, op.batch
        stage = self.stages[s]
        if stage.is_first:
            inputs = [self.microbatches[b][0]]
        else:
            inputs = [t.requires_grad_() for t in self._recv(s, b, s - 1, grad=False)]
        self.inputs[(b, s)] = inputs
        outputs = stage(*inputs)
        if stage.is_last:
            tokens, targets = self.microbatches[b]
            self.losses[b] = stage.criterion(outputs, tokens, targets)
        else:
            self.outputs[(b, s)] = outputs
            self._send(outputs, s, b, s + 1, grad=False)

    def backward(self, op: Op) -> None:
        s, b = op.stage, op.batch
        stage = self.stages[s]
        WEIGHT_GRADS.enabled = op.split
        try:
            if stage.is_last:
                self.losses[b].total.backward()
            else:
                grads = self._recv(s, b, s + 1, grad=True)
                pairs = [(o, g) for o, g in zip(self.outputs.pop((b, s)), grads)
                         if o.requires_grad]  # the first stage's zero balance has none
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        finally:
            WEIGHT_GRADS.enabled = False
        if op.split:
            WEIGHT_GRADS.flush()
        inputs = self.inputs.pop((b, s))
        if not stage.is_first:
            # A balance slot this stage overwrote gets no gradient: send zeros for it.
            self._send([torch.zeros_like(t) if t.grad is None else t.grad for t in inputs],
                       s, b, s - 1, grad=True)

    def run(self, op: Op) -> None:
        if self.progress_path:
            with open(self.progress_path, "w") as f:
                f.write(str(op))
        start = time.perf_counter()
        for part in op.parts():
            if part.kind == "F":
                self.forward(part)
            elif part.kind == "B":
                self.backward(part)
            else:
                self.weight_grads_per_w.append(WEIGHT_GRADS.pop())
        self.trace.append((str(op), start, time.perf_counter()))

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
        model = Transformer(plan["args"]).train()
        model.load_state_dict(plan["state"])
        make_weight_grads_deferrable(model)
        WEIGHT_GRADS.__init__()
        schedule = plan["schedule"]
        worker = _Worker(rank, schedule, model, plan["microbatches"],
                         os.path.join(workdir, f"rank{rank}.progress"))
        dist.barrier()
        for i, op in enumerate(schedule.orders[rank]):
            if fault.get("rank") == rank and fault.get("at_op") == i:
                if fault.get("kind") == "hang":
                    time.sleep(10 * timeout_s)
                raise RuntimeError(f"injected fault at op {i} ({op})")
            worker.run(op)
        worker.finish()
        if len(WEIGHT_GRADS):
            raise RuntimeError(f"{len(WEIGHT_GRADS)} deferred weight gradients never ran")
        # Sum what lives on several ranks: gradients (DualPipe's two copies, the tied
        # embedding) and the expert counts, then update the biases everywhere alike.
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            grads[name] = g
        for moe in model.moe_layers():
            dist.all_reduce(moe.gate.balancer.counts)
        counts = {n: m.gate.balancer.counts.clone() for n, m in model.named_modules()
                  if isinstance(m, MoE)}
        model.update_balance_biases(plan.get("gamma"))
        biases = {n: m.gate.balancer.bias.clone() for n, m in model.named_modules()
                  if isinstance(m, MoE)}
        losses = {b: {k: v.detach() for k, v in vars(l).items()}
                  for b, l in worker.losses.items()}
        out = {"trace": worker.trace, "losses": losses,
               "weight_grads_per_w": worker.weight_grads_per_w}
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
                 fault: Optional[dict] = None) -> PipelineResult:
    """Run one training step of ``model`` under ``schedule``, one process per rank.

    Args:
        schedule: From :func:`~dsv3lite.pipeline.build_schedule`.
        model: The model whose weights every rank starts from (it is not modified).
        microbatches: ``schedule.n_microbatches`` (tokens, targets) pairs of one shape.
        gamma: Bias update speed for the step's update (default the model's).
        timeout_s: A rank that waits longer than this for a message fails the run; the
            whole run is stopped after about this long plus start-up.
        fault: For tests: ``{"rank": r, "at_op": i, "kind": "raise" | "hang"}``.

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
                    "microbatches": microbatches, "gamma": gamma, "fault": fault},
                   os.path.join(workdir, "plan.pt"))
        wall = run_ranks(_worker_main, world, workdir, timeout_s,
                         (world, workdir, timeout_s), label="pipeline")
        outs = [torch.load(os.path.join(workdir, f"rank{r}.pt"), weights_only=False)
                for r in range(world)]
    losses: dict[int, dict] = {}
    for out in outs:
        losses.update(out["losses"])
    t0 = min(t[1] for out in outs for t in out["trace"])
    trace = [[(name, a - t0, b - t0) for name, a, b in out["trace"]] for out in outs]
    return PipelineResult([losses[b] for b in range(schedule.n_microbatches)],
                          outs[0]["grads"], outs[0]["biases"], outs[0]["counts"], trace,
                          schedule.order_strings(), schedule, wall,
                          [out["weight_grads_per_w"] for out in outs])


def run_ranks(target, world: int, workdir: str, timeout_s: float, args: tuple = (),
              label: str = "pipeline") -> float:
    """Run ``target(rank, *args)`` in ``world`` spawned processes and wait for them all.

    A rank that raises must write its traceback to ``workdir/rank{r}.err`` and exit
    non-zero; one that writes ``workdir/rank{r}.progress`` gets its last op named. The
    first failure, or ``timeout_s`` plus a minute of start-up, stops every process.

    Returns:
        The wall-clock seconds the ranks took.

    Raises:
        RuntimeError: naming the failed rank, its last op and its error, and the ranks
            still running (a peer's timeout is often the symptom, not the cause).
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, *args), daemon=True) for r in range(world)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    deadline = start + timeout_s + 60.0  # start-up (imports) on a slow machine
    try:
        while any(p.is_alive() for p in procs) and time.perf_counter() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
        failed = next((r for r, p in enumerate(procs) if p.exitcode not in (None, 0)), None)
        if failed is not None or any(p.is_alive() for p in procs):
            raise RuntimeError(_failure_message(procs, workdir, failed, timeout_s, label))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
    return time.perf_counter() - start


def _failure_message(procs, workdir: str, failed: Optional[int], timeout_s: float,
                     label: str) -> str:
    def where(r: int) -> str:
        path = os.path.join(workdir, f"rank{r}.progress")
        return f" (at op {open(path).read()})" if os.path.exists(path) else ""

    running = ", ".join(f"rank {r}{where(r)}" for r, p in enumerate(procs) if p.is_alive())
    if failed is None:
        return (f"{label} step timed out after {timeout_s:.0f} s + start-up: "
                f"{running} still running")
    err_path = os.path.join(workdir, f"rank{failed}.err")
    err = open(err_path).read().strip() if os.path.exists(err_path) else ""
    last_line = err.splitlines()[-1] if err else f"exit code {procs[failed].exitcode}"
    waiting = f"; still running: {running}" if running else ""
    return (f"{label} rank {failed} failed{where(failed)}: {last_line}{waiting}\n"
            f"--- rank {failed} traceback ---\n{err}")
