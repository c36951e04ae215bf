"""Pipeline schedules as data: each rank's ordered list of operations.

A pipeline cuts the model into stages, one or two per rank, and splits the batch into
micro-batches. A schedule is the order in which every rank runs the pieces of work:

- ``F``: the forward of one micro-batch through one stage;
- ``B``: its backward. In the zero-bubble schedules a backward is split in two, the
  backward-for-input (``B``, which the previous stage is waiting for) and the
  backward-for-weights (``W``, which nobody waits for and can fill a bubble later)
  (Qi et al. 2023; [V3] §3.2.1);
- ``FB``: DualPipe's pair of a forward and a backward of two different micro-batches,
  run together so that one chunk's all-to-all hides behind the other's compute
  ([V3] Fig. 4).

Four schedules are built here: ``1f1b``, ``zb1p`` (ZB-H1), ``dualpipe`` and
``dualpipev``. The two DualPipe orders follow the eight phases of
deepseek-ai/DualPipe's ``step()``, including the middle ranks' unpaired first
main-phase step, the parity-dependent start of W deferral in phase 6 and the FIFO
order of deferred W (deepseek-ai/DualPipe ``dualpipe/dualpipe.py``). The tests compare
every rank's order, op for op, with the orders recorded from the official code itself
(``tests/fixtures/dualpipe_orders.json``: DualPipe on 2-10 ranks, DualPipeV on 1-8).

Directions: DualPipe feeds the first half of the micro-batches at rank 0 (direction 0)
and the second half at the last rank (direction 1). DualPipeV sends every micro-batch
out along ranks 0..R-1 (direction 0) and back along R-1..0 (direction 1). 1F1B and ZB1P
have direction 0 only. An op's ``microbatch`` counts within its direction, from 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["Op", "Schedule", "build_schedule", "SCHEDULES"]

#: The names :func:`build_schedule` accepts: 1F1B, ZB-H1 (``"zb1p"``), DualPipe and
#: DualPipeV.
SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class Op:
    """One piece of work on one rank.

    Attributes:
        kind: ``"F"``, ``"B"``, ``"W"`` or ``"FB"``.
        direction: 0 or 1 (see the module docstring); for FB, that of the forward.
        microbatch: Index of the micro-batch within its direction.
        stage: Model stage the work runs through, 0 = embedding side.
        batch: Index of the micro-batch in the step's list (the data it carries).
        split: For ``B`` only: True when its weight gradient runs later as a ``W`` op.
        forward, backward: For ``FB`` only: the paired F and B ops.
    """

    kind: str
    direction: int = 0
    microbatch: int = 0
    stage: int = 0
    batch: int = 0
    split: bool = False
    forward: Optional["Op"] = None
    backward: Optional["Op"] = None

    def __str__(self) -> str:
        if self.kind == "FB":
            return f"FB({self.forward}|{self.backward})"
        return f"{self.kind}{self.direction}:{self.microbatch}"

    def parts(self) -> tuple["Op", ...]:
        """The F/B/W ops this op runs: itself, or an FB's forward and backward."""
        if self.kind == "FB":
            assert self.forward is not None and self.backward is not None, \
                "an FB op pairs a forward and a backward"
            return (self.forward, self.backward)
        return (self,)

    def key(self) -> str:
        """The op by what it computes: ``F:s<stage>:m<batch>``, ``B:s..:m..`` (``:zb``
        when its weight gradient waits for a W), ``W:s..:m..``, ``FB(<F>|<B>)``. The
        executor's trace and the official orders (tests/fixtures) use the same form."""
        if self.kind == "FB":
            forward, backward = self.parts()
            return f"FB({forward.key()}|{backward.key()})"
        zb = ":zb" if self.kind == "B" and self.split else ""
        return f"{self.kind}:s{self.stage}:m{self.batch}{zb}"


@dataclass(frozen=True)
class Schedule:
    """A built schedule.

    Attributes:
        name: One of :data:`SCHEDULES`.
        n_ranks: Pipeline ranks (processes, devices).
        n_microbatches: Micro-batches in one step.
        n_stages: Model stages (2 × ranks for DualPipeV, else ranks).
        orders: For each rank, its ops in execution order.
    """

    name: str
    n_ranks: int
    n_microbatches: int
    n_stages: int
    orders: tuple[tuple[Op, ...], ...]

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages held by ``rank`` (two for DualPipe/DualPipeV; 0 and S-1 may coincide)."""
        if self.name == "dualpipe":
            return (rank, self.n_stages - 1 - rank)
        if self.name == "dualpipev":
            return (rank, self.n_stages - 1 - rank)
        return (rank,)

    def rank_of(self, stage: int) -> int:
        """The rank that runs ``stage`` for direction 0 (DualPipe: direction 1 mirrors it)."""
        if self.name == "dualpipev":
            return stage if stage < self.n_ranks else self.n_stages - 1 - stage
        return stage

    def stage_rank(self, stage: int, batch: int) -> int:
        """The rank that runs ``stage`` of micro-batch ``batch``."""
        if self.name == "dualpipe" and batch >= self.n_microbatches // 2:
            return self.n_stages - 1 - stage
        return self.rank_of(stage)

    @property
    def param_copies(self) -> int:
        """Model-stage parameter sets per rank, in units of 1F1B's (1 or 2; [V3] Table 2).

        A property of the schedule's definition (two stages per rank), not something a
        simulation measures."""
        return 2 if self.name in ("dualpipe", "dualpipev") else 1

    def order_strings(self) -> list[list[str]]:
        """``orders`` written as ``F0:3``, ``B1:2``, ``W0:3``, ``FB(F0:3|B1:1)``."""
        return [[str(op) for op in order] for order in self.orders]

    def part_keys(self, rank: int, forward_only: bool = False) -> list[str]:
        """``rank``'s F, B and W parts in order, as :meth:`Op.key` (an FB gives two);
        ``forward_only``: its forwards alone, the order of a no-grad step."""
        parts = [p for op in self.orders[rank] for p in op.parts()]
        return [p.key() for p in parts if p.kind == "F" or not forward_only]


def build_schedule(name: str, n_ranks: int, n_microbatches: int) -> Schedule:
    """Build each rank's op list for a pipeline schedule.

    Args:
        name: ``"1f1b"``, ``"zb1p"``, ``"dualpipe"`` or ``"dualpipev"``.

        n_ranks: Pipeline ranks. DualPipe needs an even number; the others any >= 1.

        n_microbatches: Micro-batches per step. 1F1B and ZB1P need at least
            ``n_ranks``; DualPipe an even number >= 2·``n_ranks``; DualPipeV >= 2·``n_ranks``.

    Returns:
        A :class:`Schedule`.

    Raises:
        ValueError: naming the argument, its value and what is allowed.
    """
    if name not in SCHEDULES:
        raise ValueError(f"name={name!r} is invalid: choose one of {', '.join(SCHEDULES)}")
    for arg, value in (("n_ranks", n_ranks), ("n_microbatches", n_microbatches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg}={value!r} is invalid: must be an integer >= 1")
    if name == "dualpipe":
        if n_ranks % 2:
            raise ValueError(f"n_ranks={n_ranks} is invalid: DualPipe needs an even number of "
                             "ranks (its two directions meet in the middle); DualPipeV takes any")
        if n_microbatches % 2 or n_microbatches < 2 * n_ranks:
            raise ValueError(f"n_microbatches={n_microbatches} is invalid: DualPipe needs an even "
                             f"number >= 2 * n_ranks = {2 * n_ranks}")
        orders = [_dualpipe_rank(r, n_ranks, n_microbatches) for r in range(n_ranks)]
        return Schedule(name, n_ranks, n_microbatches, n_ranks, tuple(orders))
    if name == "dualpipev":
        if n_microbatches < 2 * n_ranks:
            raise ValueError(f"n_microbatches={n_microbatches} is invalid: DualPipeV needs "
                             f">= 2 * n_ranks = {2 * n_ranks}")
        orders = [_dualpipev_rank(r, n_ranks, n_microbatches) for r in range(n_ranks)]
        return Schedule(name, n_ranks, n_microbatches, 2 * n_ranks, tuple(orders))
    if n_microbatches < n_ranks:
        raise ValueError(f"n_microbatches={n_microbatches} is invalid: {name} needs >= "
                         f"n_ranks = {n_ranks} so that every rank reaches its steady phase")
    build = _one_f_one_b_rank if name == "1f1b" else _zb1p_rank
    orders = [build(r, n_ranks, n_microbatches) for r in range(n_ranks)]
    return Schedule(name, n_ranks, n_microbatches, n_ranks, tuple(orders))


# ---------------------------------------------------------------------------- 1F1B, ZB1P
def _one_f_one_b_rank(rank: int, n_ranks: int, n_mb: int) -> tuple[Op, ...]:
    """Warm-up forwards, then one forward / one backward, then the remaining backwards."""
    warmup = n_ranks - 1 - rank
    f = [Op("F", 0, m, rank, m) for m in range(n_mb)]
    b = [Op("B", 0, m, rank, m) for m in range(n_mb)]
    order = f[:warmup]
    for i in range(n_mb - warmup):
        order += [f[warmup + i], b[i]]
    return tuple(order + b[n_mb - warmup:])


def _zb1p_rank(rank: int, n_ranks: int, n_mb: int) -> tuple[Op, ...]:
    """ZB-H1 (Qi et al. 2023): 1F1B with B split, and some W's saved for the end.

    Every rank runs the same F/B order as 1F1B, with each B computing only the input
    gradient, so the chain of backwards that crosses the pipeline at the end is shorter.
    A W follows each B, except that rank r keeps its first r W's waiting: the later a
    rank sits in the pipeline, the sooner it runs out of work at the end, and those W's
    fill that time instead of delaying the backwards the earlier ranks wait for. The
    in-flight micro-batches, and so the activation memory, stay those of 1F1B.
    """
    warmup = n_ranks - 1 - rank
    f = [Op("F", 0, m, rank, m) for m in range(n_mb)]
    b = [Op("B", 0, m, rank, m, split=True) for m in range(n_mb)]
    w = [Op("W", 0, m, rank, m) for m in range(n_mb)]
    order, pending = list(f[:warmup]), []
    for i in range(n_mb):
        if warmup + i < n_mb:
            order.append(f[warmup + i])
        order.append(b[i])
        pending.append(w[i])
        if len(pending) > rank:  # the first `rank` W's wait for the cooldown
            order.append(pending.pop(0))
    return tuple(order + pending)


# ---------------------------------------------------------------------- DualPipe(V)
class _RankBuilder:
    """Emits one rank's ops the way deepseek-ai/DualPipe's ``step()`` calls its chunks."""

    def __init__(self, schedule: str, rank: int, n_ranks: int, n_mb: int):
        self.schedule, self.rank, self.n_ranks, self.n_mb = schedule, rank, n_ranks, n_mb
        self.n_f, self.n_b = [0, 0], [0, 0]
        self.deferred: list[Op] = []  # split backwards whose W has not run yet (FIFO)
        self.order: list[Op] = []
        self.flip = schedule == "dualpipe" and rank >= n_ranks // 2  # second half

    def _direction(self, phase: int) -> int:
        return phase ^ self.flip

    def _op(self, kind: str, phase: int, split: bool = False) -> Op:
        d = self._direction(phase)
        counter = self.n_f if kind == "F" else self.n_b
        m = counter[d]
        counter[d] += 1
        r, R = self.rank, self.n_ranks
        if self.schedule == "dualpipe":
            stage = r if d == 0 else R - 1 - r
            batch = m if d == 0 else self.n_mb // 2 + m
        else:  # dualpipev: out along 0..R-1, back along stages R..2R-1
            stage = r if d == 0 else 2 * R - 1 - r
            batch = m
        return Op(kind, d, m, stage, batch, split=split)

    def forward(self, phase: int) -> None:
        self.order.append(self._op("F", phase))

    def backward(self, phase: int, zero_bubble: bool = False) -> None:
        op = self._op("B", phase, split=zero_bubble)
        if zero_bubble:
            self.deferred.append(op)
        self.order.append(op)

    def forward_backward(self, phase_f: int, phase_b: int) -> None:
        f, b = self._op("F", phase_f), self._op("B", phase_b)  # a pair never defers W
        self.order.append(Op("FB", f.direction, f.microbatch, f.stage, f.batch,
                             forward=f, backward=b))

    def weight(self) -> None:
        b = self.deferred.pop(0)
        self.order.append(Op("W", b.direction, b.microbatch, b.stage, b.batch))


def _dualpipe_phases(rb: _RankBuilder, half_ranks: int, half_rank: int, main_steps: int,
                     unpaired_first: bool) -> tuple[Op, ...]:
    """The eight phases shared by DualPipe and DualPipeV ([DP] ``step()``)."""
    outer = half_ranks - half_rank - 1
    for _ in range(2 * outer):                        # 1: nF0
        rb.forward(0)
    for _ in range(half_rank + 1):                    # 2: nF0F1
        rb.forward(0)
        rb.forward(1)
    for _ in range(outer):                            # 3: nB1W1F1, zero bubble
        rb.backward(1, zero_bubble=True)
        rb.weight()
        rb.forward(1)
    for i in range(main_steps):                       # 4: nF0B1F1B0, the main phase
        if i == 0 and unpaired_first:
            rb.forward(0)   # the middle ranks leave their first pair unpaired
            rb.backward(1)
        else:
            rb.forward_backward(0, 1)
        rb.forward_backward(1, 0)
    for _ in range(outer):                            # 5: nB1F1B0
        rb.backward(1)
        rb.forward_backward(1, 0)
    zero_bubble = False                               # 6: nB1B0, ZB for the second half
    n6 = half_rank + 1
    for i in range(n6):
        if i == n6 // 2 and half_rank % 2 == 1:
            zero_bubble = True
        rb.backward(1, zero_bubble)
        if i == n6 // 2 and half_rank % 2 == 0:
            zero_bubble = True
        rb.backward(0, zero_bubble)
    for _ in range(outer):                            # 7: nWB0, zero bubble
        rb.weight()
        rb.backward(0, zero_bubble=True)
    for _ in range(half_rank + 1):                    # 8: nW
        rb.weight()
    assert not rb.deferred, "every deferred weight gradient must have run"
    return tuple(rb.order)


def _dualpipe_rank(rank: int, n_ranks: int, n_mb: int) -> tuple[Op, ...]:
    half_ranks, half_rank = n_ranks // 2, min(rank, n_ranks - 1 - rank)
    middle = rank in (half_ranks - 1, half_ranks)
    rb = _RankBuilder("dualpipe", rank, n_ranks, n_mb)
    return _dualpipe_phases(rb, half_ranks, half_rank, n_mb // 2 - n_ranks + half_rank + 1,
                            unpaired_first=middle)


def _dualpipev_rank(rank: int, n_ranks: int, n_mb: int) -> tuple[Op, ...]:
    rb = _RankBuilder("dualpipev", rank, n_ranks, n_mb)
    return _dualpipe_phases(rb, n_ranks, rank, n_mb - 2 * n_ranks + rank + 1,
                            unpaired_first=rank == n_ranks - 1)
