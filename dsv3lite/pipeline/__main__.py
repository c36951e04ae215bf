"""``python -m dsv3lite.pipeline``: simulate a schedule, or check the real executor.

    python -m dsv3lite.pipeline simulate --schedule dualpipe --ranks 8 --microbatches 20
    python -m dsv3lite.pipeline check --schedule dualpipev --ranks 2 --microbatches 4 --json

``simulate`` prints the makespan, each rank's bubble and peak activations (``--json``:
one JSON object, op orders included). ``check`` runs one training step of a small model
with one process per rank and compares it with one process; it exits 1 on a mismatch.
Bad arguments give one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn, Optional

from .check import check
from .schedules import SCHEDULES, build_schedule
from .simulate import simulate, table2_bubble


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage block
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m dsv3lite.pipeline",
                     description="Pipeline schedules: simulate them, or check the executor.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, text in (("simulate", "play a schedule with given costs"),
                       ("check", "run the multi-process step against one process")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--schedule", required=True, help=", ".join(SCHEDULES))
        p.add_argument("--ranks", type=int, required=True)
        p.add_argument("--microbatches", type=int, required=True)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "simulate":
            for cost, default in (("F", 1.0), ("B", 2.0), ("W", 1.0), ("comm", 0.0),
                                  ("p2p", 0.0)):
                p.add_argument(f"--{cost}", type=float, default=default)
            p.add_argument("--FB", type=float, default=None,
                           help="cost of an overlapped F&B pair (default F + B)")
        else:
            p.add_argument("--timeout", type=float, default=120.0,
                           help="seconds a rank may wait before the run fails")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    ns = _parser().parse_args(argv)
    try:
        schedule = build_schedule(ns.schedule, ns.ranks, ns.microbatches)
        if ns.command == "simulate":
            t = simulate(schedule, ns.F, ns.B, ns.W, ns.FB, ns.comm, ns.p2p)
        else:
            if ns.timeout <= 0:
                raise ValueError(f"timeout={ns.timeout} is invalid: must be > 0 seconds")
            report = check(ns.schedule, ns.ranks, ns.microbatches, timeout_s=ns.timeout)
    except ValueError as exc:  # name the command-line flag, not the Python argument
        message = str(exc)
        for python, flag in (("n_ranks=", "--ranks="), ("n_microbatches=", "--microbatches="),
                             ("name=", "--schedule=")):
            message = message.replace(python, flag)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a rank failed or hung
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    if ns.command == "simulate":
        if ns.json:
            data = t.as_dict()
            data.pop("events")
            print(json.dumps(data))
            return 0
        pp = schedule.n_stages
        print(f"{schedule.name}: {schedule.n_ranks} ranks, {schedule.n_stages} stages, "
              f"{schedule.n_microbatches} micro-batches; makespan {t.makespan:g}")
        print(f"[V3] Table 2 bubble for PP={pp}: "
              f"{table2_bubble(schedule.name, pp, ns.F, ns.B, ns.W, ns.FB):g}")
        print("rank  idle  peak activations")
        for r in range(schedule.n_ranks):
            print(f"{r:>4}  {t.idle[r]:>4g}  {t.peak_activations[r]:>16}")
        print(f"parameter copies per rank: {t.param_copies}")
        return 0
    if ns.json:
        print(json.dumps(report.as_dict()))
    else:
        for key, value in report.as_dict().items():
            print(f"{key:>24}: {value}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
