"""Run one function in several processes, one per pipeline rank, and report failures well.

Both pipeline runners (:mod:`dsv3lite.pipeline.executor` and
:mod:`dsv3lite.pipeline.torch_pipelining`) start their ranks here. A rank that fails writes
its traceback to a file; the first failure, or a hang past the timeout, stops every
process and raises an error that names the rank, the op it was running and its error.
A rank's standard output goes to standard error, so that what the ranks or their
libraries print (torch 2.10's gloo announces each connection there) never mixes into the
caller's own output, such as ``python -m dsv3lite.pipeline check --json``.
"""

from __future__ import annotations

import os
import time
from multiprocessing.process import BaseProcess
from typing import Callable, Optional, Sequence

import torch.multiprocessing as mp

__all__ = ["run_ranks"]


def run_ranks(target: Callable[..., object], world: int, workdir: str, timeout_s: float,
              args: tuple[object, ...] = (), label: str = "pipeline") -> float:
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
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(target, r, *args), daemon=True)
             for r in range(world)]
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


def _rank_main(target: Callable[..., object], rank: int, *args: object) -> None:
    """One rank: its standard output joins standard error, then ``target(rank, *args)``."""
    os.dup2(2, 1)
    target(rank, *args)


def _failure_message(procs: Sequence[BaseProcess], workdir: str, failed: Optional[int],
                     timeout_s: float, label: str) -> str:
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
