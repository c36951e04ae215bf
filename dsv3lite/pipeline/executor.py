"""Run one training step of a dsv3lite model as a real pipeline: one process per rank.

The model is cut into stages: the embedding and the first blocks; middle blocks; the
last blocks, the final norm, the head, the MTP modules and the loss. Each rank is a
process; activations and gradients travel between them with ``torch.distributed``
point-to-point messages on the gloo backend (CPU), and every rank runs exactly the op
list that :func:`~dsv3lite.pipeline.build_schedule` gives it, recording a trace.

What makes it DeepSeek's and not a toy:

- **Zero-bubble W.** Every Linear runs through :class:`_DeferrableLinear`, whose
  backward computes the input gradient at once and, while :data:`WEIGHT_GRADS` is
  enabled, stores the weight-gradient GEMM as a closure; a ``W`` op runs the oldest
  stored group (FIFO), as deepseek-ai/DualPipe's ``WeightGradStore`` does. The other
  weights (norm gains, the router, the embedding) are small and get their gradients
  during B.
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
import torch.nn.functional as F
from torch import nn

from ..config import ModelArgs
from ..model import LossBreakdown, Transformer
from ..moe import MoE
from .schedules import Op, Schedule, build_schedule

__all__ = ["WEIGHT_GRADS", "PipelineStage", "split_layers", "build_stages", "check_args",
           "PipelineResult", "CheckReport", "run_pipeline", "reference_step", "check",
           "cal_diff"]


# ------------------------------------------------------------ deferred weight gradients
class WeightGradStore:
    """Closures computing weight gradients, queued so a later ``W`` op can run them.

    While ``enabled``, a Linear's backward puts its weight-gradient closure here; at the
    end of a split backward :meth:`flush` closes the group; :meth:`pop` runs the oldest
    group (the schedules' W ops are FIFO).
    """

    def __init__(self) -> None:
        self.enabled = False
        self._open: list = []
        self._groups: list[list] = []

    def put(self, fn) -> None:
        self._open.append(fn)

    def flush(self) -> None:
        self._groups.append(self._open)
        self._open = []

    def pop(self) -> int:
        """Run the oldest group; return how many weight gradients it computed."""
        if not self._groups:
            raise RuntimeError("a W op found no deferred weight gradient: the schedule "
                               "runs W before its split B")
        group = self._groups.pop(0)
        for fn in group:
            fn()
        return len(group)

    def __len__(self) -> int:
        return len(self._groups)


WEIGHT_GRADS = WeightGradStore()


class _LinearFunction(torch.autograd.Function):
    """y = x Wᵀ whose backward can defer dW = dyᵀ x to a later W op."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
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
    ``(h, balance)`` where ``balance`` holds the sequence-wise balance loss of each main
    MoE layer so far (zeros for layers not reached yet). The last stage's
    :meth:`criterion` turns them into the loss parts.
    """

    def __init__(self, model: Transformer, index: int, n_stages: int):
        super().__init__()
        self.model_ref = [model]  # a list, so the model is not registered twice
        self.index, self.n_stages = index, n_stages
        self.layer_ids = split_layers(model.args.n_layers, n_stages)[index]
        self.layers = nn.ModuleList(model.layers[i] for i in self.layer_ids)
        self.is_first, self.is_last = index == 0, index == n_stages - 1
        if self.is_first:
            self.embed = model.embed
        if self.is_last:
            self.norm, self.head, self.mtp = model.norm, model.head, model.mtp
        moe_ids = [i for i in range(model.args.n_layers) if isinstance(model.layers[i].ffn, MoE)]
        self.n_moe = len(moe_ids)
        self.moe_slots = [(moe_ids.index(i), model.layers[i].ffn) for i in self.layer_ids
                          if i in moe_ids]

    def carried_shapes(self, batch: int, seq_len: int) -> list[tuple[int, ...]]:
        """Shapes of the tensors this stage sends on (and receives gradients for)."""
        shapes = [(batch, seq_len, self.model_ref[0].args.dim)]
        return shapes + [(self.n_moe,)] if self.n_moe else shapes

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model_ref[0]
        if self.is_first:
            (tokens,) = inputs
            h = self.embed(tokens)
            balance = h.new_zeros(self.n_moe) if self.n_moe else None
        else:
            h, balance = inputs[0], (inputs[1] if self.n_moe else None)
        T = h.shape[1]
        cos, sin = model.rope_cos[:T], model.rope_sin[:T]
        for i, layer in zip(self.layer_ids, self.layers):
            h = layer(h, cos, sin)
        if self.moe_slots and model.training:
            slots = list(balance.unbind())
            for slot, moe in self.moe_slots:
                slots[slot], moe.balance_loss = moe.balance_loss, None
            balance = torch.stack(slots)
        return (h,) if balance is None else (h, balance)

    def criterion(self, outputs: tuple[torch.Tensor, ...], tokens: torch.Tensor,
                  targets: torch.Tensor) -> LossBreakdown:
        """The last stage's loss: head, MTP and balance, as ``Transformer.forward``."""
        if not self.is_last:
            raise RuntimeError(f"stage {self.index} is not the last stage: it has no loss")
        model = self.model_ref[0]
        h = outputs[0]
        if self.n_moe and model.training:
            main_moes = [model.layers[i].ffn for i in range(model.args.n_layers)
                         if isinstance(model.layers[i].ffn, MoE)]
            for moe, loss in zip(main_moes, outputs[1].unbind()):
                moe.balance_loss = loss
        logits = self.head(self.norm(h))
        return model.loss_parts(tokens, targets, logits, h)


def build_stages(model: Transformer, schedule: Schedule, rank: int) -> dict[int, PipelineStage]:
    """The stage modules ``rank`` runs under ``schedule``, keyed by stage index."""
    return {s: PipelineStage(model, s, schedule.n_stages) for s in schedule.stages_of(rank)}


# ------------------------------------------------------------------------- the plan
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


def check_args(n_stages: int, n_layers: int) -> ModelArgs:
    """The model :func:`check` uses by default: the tiny preset with one block per stage,
    one dense block, MTP depth 1, and weights of unit gain (N(0, 1/fan_in)) so that
    routing and attention are far from uniform."""
    return ModelArgs.tiny(n_layers=max(n_layers, n_stages), n_dense_layers=1, n_mtp_depth=1)


def _unit_gain_(model: Transformer) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, module.weight.shape[1] ** -0.5)


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
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    world = schedule.n_ranks
    with tempfile.TemporaryDirectory(prefix="dsv3lite-pipeline-") as workdir:
        torch.save({"args": model.args, "state": model.state_dict(), "schedule": schedule,
                    "microbatches": microbatches, "gamma": gamma, "fault": fault},
                   os.path.join(workdir, "plan.pt"))
        procs = [ctx.Process(target=_worker_main, args=(r, world, workdir, timeout_s),
                             daemon=True) for r in range(world)]
        start = time.perf_counter()
        for p in procs:
            p.start()
        deadline = start + timeout_s + 60.0  # start-up (imports) on a slow machine
        try:
            failed = None
            while any(p.is_alive() for p in procs):
                failed = next((r for r, p in enumerate(procs)
                               if p.exitcode not in (None, 0)), None)
                if failed is not None or time.perf_counter() > deadline:
                    break
                time.sleep(0.05)
            if failed is None:
                failed = next((r for r, p in enumerate(procs) if p.exitcode not in (None, 0)),
                              None)
            if failed is not None or any(p.is_alive() for p in procs):
                raise RuntimeError(_failure_message(procs, workdir, failed, timeout_s))
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=10)
        wall = time.perf_counter() - start
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


def _failure_message(procs, workdir: str, failed: Optional[int], timeout_s: float) -> str:
    def last_op(r: int) -> str:
        path = os.path.join(workdir, f"rank{r}.progress")
        return open(path).read() if os.path.exists(path) else "(before its first op)"

    if failed is None:
        stuck = [r for r, p in enumerate(procs) if p.is_alive()]
        return (f"pipeline step timed out after {timeout_s:.0f} s + start-up: rank(s) "
                + ", ".join(f"{r} (at op {last_op(r)})" for r in stuck) + " still running")
    err_path = os.path.join(workdir, f"rank{failed}.err")
    err = open(err_path).read().strip() if os.path.exists(err_path) else "no traceback"
    last_line = err.splitlines()[-1] if err else ""
    others = [r for r, p in enumerate(procs) if p.is_alive()]
    waiting = ("; still running: " + ", ".join(f"rank {r} (at op {last_op(r)})"
                                              for r in others)) if others else ""
    return (f"pipeline rank {failed} failed at op {last_op(failed)}: {last_line}{waiting}\n"
            f"--- rank {failed} traceback ---\n{err}")


# ------------------------------------------------------------- the single-process check
def reference_step(model: Transformer, microbatches, *, gamma: Optional[float] = None
                   ) -> PipelineResult:
    """The same step in one process: each micro-batch forward and backward in turn, then
    the bias update (on a copy of ``model``). Threads are pinned to 1, like the ranks'."""
    import copy

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
