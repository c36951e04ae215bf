"""Play a schedule as a dependency graph with given costs: a timeline, bubbles, memory.

Every rank runs its op list in order. An op starts when the rank is free and its
inputs exist: a forward needs the previous stage's forward of the same micro-batch, a
backward needs the next stage's backward (the last stage's needs its own forward), a
W needs its B. Costs are in arbitrary time units ([V3] Table 2's F, B, W, F&B):

- ``F``: one forward chunk; ``B``: one full backward chunk (input and weights);
  ``W``: the weight part of it, so a split backward-for-input costs ``B - W``;
- ``FB``: an overlapped forward+backward pair (default ``F + B``: no gain from pairing
  unless there is communication to hide);
- ``comm``: the expert-parallel all-to-all time of one chunk (dispatch + combine). A
  lone F or B waits for it (it is on the chunk's critical path); a pair runs one
  chunk's all-to-all under the other's compute, so with ``FB`` not given it costs
  ``max(F + B, 2·comm)`` ([V3] §3.2.1, Fig. 4). W has no communication;
- ``p2p``: the time to send an activation or a gradient to a neighbouring rank.

The bubble of a rank is its idle time: makespan minus the time it computes.
Activations are counted in units of one micro-batch through one stage, alive from the
start of its F to the end of its B, as [V3] Table 2 counts them. A split B frees them
except what its W still needs: each Linear's saved input and its output gradient. That
part depends on the model, not on the schedule, so it is counted separately, as the
most deferred W's a rank holds at once (``peak_deferred_w``). The parameter copies are
not simulated either: they follow from the schedule's definition
(:attr:`~dsv3lite.pipeline.Schedule.param_copies`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from .schedules import Op, Schedule, build_schedule

__all__ = ["Event", "Timeline", "simulate", "table2_bubble", "table2"]


@dataclass(frozen=True)
class Event:
    """One op as it ran: on ``rank`` from ``start`` to ``end``."""

    rank: int
    op: Op
    start: float
    end: float


@dataclass
class Timeline:
    """What :func:`simulate` (or the executor's trace) returns.

    Attributes:
        schedule: The schedule played.

        events: Every op with its rank, start and end, in each rank's order.

        makespan: Time from the first start to the last end.

        busy: Per rank, the time spent computing.

        idle: Per rank, makespan − busy (the bubble).

        peak_activations: Per rank, the most micro-batch-stage activations alive at once
            (from the start of an F to the end of its B).

        param_copies: Stage parameter sets per rank, relative to 1F1B (1 or 2): the
            schedule's constant, not a measurement.

        costs: The costs used (F, B, W, FB, comm, p2p).

        peak_deferred_w: Per rank, the most W's waiting at once (split B's whose W has
            not run): each keeps its Linears' inputs and output gradients alive.
    """

    schedule: Schedule
    events: list[Event]
    makespan: float
    busy: list[float]
    idle: list[float]
    peak_activations: list[int]
    param_copies: int
    costs: dict = field(default_factory=dict)
    peak_deferred_w: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The JSON view the CLI prints (``orders`` as op strings)."""
        s = self.schedule
        return {"schedule": s.name, "ranks": s.n_ranks, "microbatches": s.n_microbatches,
                "stages": s.n_stages, "costs": self.costs, "makespan": self.makespan,
                "busy": self.busy, "idle": self.idle,
                "peak_activations": self.peak_activations,
                "peak_deferred_w": self.peak_deferred_w,
                "param_copies": self.param_copies, "orders": s.order_strings(),
                "events": [{"rank": e.rank, "op": str(e.op), "start": e.start, "end": e.end}
                           for e in self.events]}


def _check_cost(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}={value!r} is invalid: costs must be numbers >= 0")
    return float(value)


def _durations(F: float, B: float, W: float, FB: Optional[float], comm: float
               ) -> tuple[Callable[[Op], float], float]:
    if W > B:
        raise ValueError(f"W={W} is invalid: the weight part of a backward must be <= B={B}")
    pair = max(F + B, 2 * comm) if FB is None else FB

    def duration(op: Op) -> float:
        if op.kind == "F":
            return F + comm
        if op.kind == "B":
            return (B - W if op.split else B) + comm
        if op.kind == "W":
            return W
        return pair
    return duration, pair


def simulate(schedule: Schedule | str, F: float = 1.0, B: float = 2.0, W: float = 1.0,
             FB: Optional[float] = None, comm: float = 0.0, p2p: float = 0.0, *,
             n_ranks: Optional[int] = None, n_microbatches: Optional[int] = None) -> Timeline:
    """Play ``schedule`` with the given costs.

    Args:
        schedule: A :class:`Schedule`, or a schedule name together with ``n_ranks`` and
            ``n_microbatches``.

        F, B, W, FB, comm, p2p: Costs (see the module docstring); all >= 0, W <= B.

    Returns:
        A :class:`Timeline`.

    Raises:
        ValueError: on a bad cost, or if the schedule deadlocks (an op waits for
            work that its rank's order places after it).
    """
    if isinstance(schedule, str):
        if n_ranks is None or n_microbatches is None:
            raise ValueError("simulate(name, ...) needs n_ranks= and n_microbatches=")
        schedule = build_schedule(schedule, n_ranks, n_microbatches)
    F, B, W, comm, p2p = (_check_cost(n, v) for n, v in
                          (("F", F), ("B", B), ("W", W), ("comm", comm), ("p2p", p2p)))
    FB = None if FB is None else _check_cost("FB", FB)
    duration, pair = _durations(F, B, W, FB, comm)
    last = schedule.n_stages - 1

    done: dict[tuple[str, int, int], tuple[float, int]] = {}  # (kind, batch, stage) -> end, rank

    def ready_time(part: Op, rank: int) -> Optional[float]:
        """When ``part``'s inputs are available on ``rank`` (None: not yet produced)."""
        if part.kind == "F":
            need = None if part.stage == 0 else ("F", part.batch, part.stage - 1)
        elif part.kind == "B":
            need = (("F", part.batch, last) if part.stage == last
                    else ("B", part.batch, part.stage + 1))
        else:
            need = ("B", part.batch, part.stage)
        if need is None:
            return 0.0
        if need not in done:
            return None
        end, where = done[need]
        return end + (p2p if where != rank else 0.0)

    n = schedule.n_ranks
    nxt, free = [0] * n, [0.0] * n
    events: list[list[Event]] = [[] for _ in range(n)]
    remaining = sum(len(o) for o in schedule.orders)
    while remaining:
        progressed = False
        for r in range(n):
            while nxt[r] < len(schedule.orders[r]):
                op = schedule.orders[r][nxt[r]]
                ready = [ready_time(p, r) for p in op.parts()]
                times = [t for t in ready if t is not None]
                if len(times) < len(ready):  # an input is not produced yet
                    break
                start = max([free[r], *times])
                end = start + duration(op)
                for p in op.parts():
                    done[(p.kind, p.batch, p.stage)] = (end, r)
                events[r].append(Event(r, op, start, end))
                free[r], nxt[r] = end, nxt[r] + 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(schedule.orders[r][nxt[r]]) for r in range(n)
                     if nxt[r] < len(schedule.orders[r])}
            raise ValueError(f"schedule {schedule.name!r} deadlocks: ranks wait at {stuck}")

    makespan = max(free)
    busy = [sum(e.end - e.start for e in evs) for evs in events]
    peaks, peaks_w = [], []
    for evs in events:
        live = peak = waiting = peak_w = 0
        for e in evs:
            live += sum(p.kind == "F" for p in e.op.parts())
            peak = max(peak, live)
            live -= sum(p.kind == "B" for p in e.op.parts())
            waiting += sum(p.kind == "B" and p.split for p in e.op.parts())
            peak_w = max(peak_w, waiting)
            waiting -= e.op.kind == "W"
        peaks.append(peak)
        peaks_w.append(peak_w)
    costs = {"F": F, "B": B, "W": W, "FB": pair, "comm": comm, "p2p": p2p}
    return Timeline(schedule, [e for evs in events for e in evs], makespan, busy,
                    [makespan - b for b in busy], peaks, schedule.param_copies, costs,
                    peaks_w)


def table2_bubble(name: str, pp: int, F: float = 1.0, B: float = 2.0, W: float = 1.0,
                  FB: Optional[float] = None) -> float:
    """The bubble column of [V3] Table 2 for ``pp`` pipeline stages.

    1F1B (PP−1)(F+B); ZB1P (PP−1)(F+B−2W); DualPipe and DualPipeV (PP/2−1)(F&B+B−3W).
    For DualPipeV, PP is the number of stages, twice the number of devices.
    """
    FB = F + B if FB is None else FB
    if name == "1f1b":
        return (pp - 1) * (F + B)
    if name == "zb1p":
        return (pp - 1) * (F + B - 2 * W)
    if name in ("dualpipe", "dualpipev"):
        return (pp / 2 - 1) * (FB + B - 3 * W)
    raise ValueError(f"name={name!r} is invalid: choose one of 1f1b, zb1p, dualpipe, dualpipev")


def table2(pp: int = 8, n_microbatches: int = 20, F: float = 1.0, B: float = 2.0,
           W: float = 1.0, FB: Optional[float] = None) -> list[dict]:
    """[V3] Table 2 next to the simulator's numbers, one row per method.

    ``pp`` is the number of stages; DualPipeV runs them on pp/2 devices.
    Each row: method, formula bubble, simulated idle (min and max over ranks),
    peak activations (max over ranks), peak deferred W's (max over ranks), parameter
    copies (the schedule's constant, not simulated), devices.
    """
    rows = []
    for name in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
        ranks = pp // 2 if name == "dualpipev" else pp
        t = simulate(build_schedule(name, ranks, n_microbatches), F, B, W, FB)
        rows.append({"method": name, "devices": ranks,
                     "bubble_formula": table2_bubble(name, pp, F, B, W, FB),
                     "idle_min": min(t.idle), "idle_max": max(t.idle),
                     "idle": t.idle, "makespan": t.makespan,
                     "peak_activations": max(t.peak_activations),
                     "activations_formula": pp + 1 if name.startswith("dual") else pp,
                     "peak_deferred_w": max(t.peak_deferred_w),
                     "param_copies": t.param_copies})
    return rows
