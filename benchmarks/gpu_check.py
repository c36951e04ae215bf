"""Everything a GPU machine should run, in one command that fits one 10-minute call.

    python benchmarks/gpu_check.py                 # on a CUDA machine (make gpu-check)
    python benchmarks/gpu_check.py --smoke         # the same steps on a CPU (make gpu-check SMOKE=1)
    python benchmarks/gpu_check.py --steps K1,M1 --cap M1=200   # a rerun of two steps

A GPU is lent to this project now and then, for minutes, in commands of at most ten
minutes whose files come back only from ``$OUT`` (``../shared/spec/performance.md``). So
this script runs its steps in a fixed order, each a subprocess with its own time cap:

1. ``env``: device, capability, free memory, torch/triton/transformers versions;
2. ``gpu-tests``: ``pytest -m gpu`` (the kernels and the training step on the device);
3. ``K5``, ``K1``, ``K3``, ``K4``, ``K6``: ``benchmarks/fp8.py --only <goal>``, the FP8
   kernels against their same-run peers;
4. ``M1``: ``benchmarks/train.py --only M1``, our training step against transformers'
   DeepseekV3, both BF16 and compiled; ``M2``: ``--only M2``, FP8 against our BF16 step;
5. ``extras``: in whatever time the others left, chapters 5 and 8 executed on the GPU
   (``benchmarks/robustness.py``, with their training shortened through the chapters'
   knobs so that they fit; their asserted outcomes are recorded, not required, since
   they are sized for the full runs). It needs jupytext, nbclient and ipykernel in the
   interpreter and is skipped, with the reason, where they are missing or the time is.

A step whose cap exceeds what is left of ``--budget`` (480 s by default: the call's 10
minutes less the machine's start and the file transfer; ``--cap STEP=SECONDS`` changes
one cap) is skipped and marked skipped;
one that overruns its cap is killed with its whole process group and marked timeout.
The moment a step ends its record (status ok/failed/skipped/timeout, seconds, the
child's JSON, the tail of its output) is written into its group's file, so a call cut
off keeps every finished step. The device tool returns at most 8 files from ``$OUT``,
so the steps share files by group, all in ``OUT`` (``$OUT`` if set, else
``benchmarks/results/``; a run rewrites all six):

- ``gpu-check-env.json`` (env, gpu-tests), ``gpu-check-fp8.json`` (K5-K6, with the parts'
  JSON merged into one dict of the shape ``benchmarks/fp8.py`` writes),
  ``gpu-check-train.json`` (M1, M2, merged likewise), ``gpu-check-extras.json``;
- ``gpu-check-summary.json`` (every step's status and the goals table of
  ``benchmarks/summary.py``) and ``gpu-check.log`` (every child's full output).

The children write their own JSON into a temporary folder, not into ``OUT``. The run
ends with a table of the steps and one of the goals. Exit status 1 if a step failed or
timed out, else 0; without CUDA (and without ``--smoke``) it says so, marks the device
steps skipped and exits 0. ``--smoke`` runs the same steps on the CPU: tiny shapes, the
Triton interpreter for the kernel steps (``TRITON_INTERPRET=1`` in their environment), a
one-step training row; ``pytest -m gpu`` runs and every test in it skips. Its steps
get ``SMOKE_CAP`` seconds each, not the GPU caps.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
FP8_GOALS = ("K5", "K1", "K3", "K4", "K6")
ORDER = ("env", "gpu-tests", *FP8_GOALS, "M1", "M2", "extras")
GROUP = {"env": "env", "gpu-tests": "env", **dict.fromkeys(FP8_GOALS, "fp8"),
         "M1": "train", "M2": "train", "extras": "extras"}
# Seconds per step on an H100/H200; they add up to the default budget, so a run in which
# every step needs its whole cap still fits. extras only runs in time the others left.
CAPS = {"env": 20, "gpu-tests": 80, "K5": 20, "K1": 45, "K3": 25, "K4": 30, "K6": 30,
        "M1": 130, "M2": 100, "extras": 60}
DEFAULT_BUDGET = 480.0
# The smoke run is a check of the script, not of speed: the Triton interpreter on a
# loaded 2-core CPU is slow and uneven, so each step gets a generous cap of its own.
SMOKE_CAP = 180.0
SMOKE_BUDGET = SMOKE_CAP * len(ORDER)
TAIL_CHARS = 4000
# The extras step shortens the chapters' GPU training through their knobs
# (dsv3lite.outcomes.knob): chapter 8's 3,000 steps and chapter 5's 600 + 200 would not
# fit in the minutes a check has left.
CHAPTER_KNOBS = {"DSV3LITE_STEPS": 300, "DSV3LITE_BASE_STEPS": 200,
                 "DSV3LITE_CONTINUE_STEPS": 60}

ENV_SCRIPT = r"""
import json, os, platform, sys
import torch
info = {"python": platform.python_version(), "executable": sys.executable,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET")}
for name in ("triton", "transformers", "numpy"):
    try:
        info[name] = __import__(name).__version__
    except Exception as exc:
        info[name] = f"not importable: {type(exc).__name__}: {exc}"
if info["cuda_available"]:
    free, total = torch.cuda.mem_get_info()
    props = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                capability=list(torch.cuda.get_device_capability(0)),
                multiprocessors=props.multi_processor_count,
                memory_free_bytes=free, memory_total_bytes=total)
else:
    info["device"] = platform.processor() or platform.machine()
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
"""


@dataclass
class Step:
    """One step: what to run, for how long at most, or why it is skipped.

    ``command`` is run with ``env`` added to this process's environment, in a fresh
    folder whose path replaces ``{tmp}`` in the command; the JSON files it writes there
    become the step's ``result``.
    """

    name: str
    cap: float
    command: Optional[list[str]] = None
    env: dict = field(default_factory=dict)
    skip_reason: Optional[str] = None
    fill: bool = False  # take whatever the budget has left (at least ``cap``)


def out_dir(explicit: Optional[str] = None) -> Path:
    """Where the JSON goes: ``explicit``, else ``$OUT``, else ``benchmarks/results``."""
    return Path(explicit or os.environ.get("OUT") or ROOT / "benchmarks" / "results")


def merge(parts: list[dict]) -> dict:
    """One dict from the parts' JSON: lists concatenated, dicts merged, the first
    non-null scalar kept (device, versions, date agree between parts of one run)."""
    merged: dict = {}
    for part in parts:
        for key, value in part.items():
            have = merged.get(key)
            if isinstance(value, list) and isinstance(have, list):
                merged[key] = have + value
            elif isinstance(value, dict) and isinstance(have, dict):
                merged[key] = {**have, **{k: v for k, v in value.items()
                                          if v is not None or k not in have}}
            elif have is None:
                merged[key] = value
    return merged


class Runner:
    """Runs steps against one budget and writes each group's JSON when a step ends."""

    def __init__(self, out: Path, budget: float, smoke: bool = False, log=None,
                 echo: bool = True):
        self.out, self.budget, self.smoke, self.echo = out, budget, smoke, echo
        self.start = time.monotonic()
        self.records: dict[str, dict] = {}
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = log or open(self.out / "gpu-check.log", "w", buffering=1)
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def _say(self, text: str) -> None:
        self.log.write(text)
        if self.echo:
            sys.stdout.write(text)
            sys.stdout.flush()

    def run(self, step: Step) -> dict:
        """Run (or skip) ``step``, record it, write its group's file; returns the record."""
        record = {"step": step.name, "cap_s": step.cap, "status": None, "seconds": 0.0,
                  "started_at_s": round(time.monotonic() - self.start, 2)}
        if step.fill and step.skip_reason is None and self.left() > step.cap:
            step.cap = self.left() - 5.0  # all that is left, less time to write the files
            record["cap_s"] = step.cap
        if step.skip_reason is None and step.cap > self.left():
            step.skip_reason = (f"its cap of {step.cap:.0f} s exceeds the {self.left():.0f} s "
                                f"left of the {self.budget:.0f} s budget")
        if step.skip_reason is not None:
            record.update(status="skipped", reason=step.skip_reason)
            self._say(f"\n== {step.name}: skipped ({step.skip_reason})\n")
        else:
            record.update(self._execute(step))
        self.records[step.name] = record
        self.write_group(GROUP.get(step.name, step.name))
        return record

    def _execute(self, step: Step) -> dict:
        work = self.tmp / step.name
        work.mkdir(parents=True, exist_ok=True)
        command = [part.replace("{tmp}", str(work)) for part in step.command]
        env = {**os.environ, **step.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self._say(f"\n== {step.name} (cap {step.cap:.0f} s, {self.left():.0f} s left): "
                  f"{' '.join(command)}\n")
        tail: list[str] = []
        begun = time.monotonic()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True)

        def pump():  # echo the child's output as it comes and keep its tail
            for line in proc.stdout:
                self._say(line)
                tail.append(line)
                while len(tail) > 400:
                    tail.pop(0)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=step.cap)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and what it started (compile workers)
            code = proc.wait()
            status = "timeout"
        reader.join(timeout=5)
        seconds = time.monotonic() - begun
        results = {p.name: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))
                   if p.stat().st_size}
        result = next(iter(results.values())) if len(results) == 1 else (results or None)
        self._say(f"== {step.name}: {status} in {seconds:.1f} s (exit {code})\n")
        return {"status": status, "seconds": round(seconds, 2), "returncode": code,
                "command": command, "result": result,
                "output_tail": "".join(tail)[-TAIL_CHARS:]}

    def write_group(self, group: str) -> Path:
        steps = {n: r for n, r in self.records.items() if GROUP.get(n, n) == group}
        data = {"group": group, "smoke": self.smoke, "steps": steps}
        parts = [r["result"] for r in steps.values() if isinstance(r.get("result"), dict)]
        if group in ("fp8", "train") and parts:
            data["merged"] = merge(parts)
        path = self.out / f"gpu-check-{group}.json"
        path.write_text(json.dumps(data, indent=1, default=str))
        return path


def _missing_modules(python: str, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` the interpreter ``python`` cannot import."""
    check = ("import importlib, sys\nmissing = []\nfor n in sys.argv[1:]:\n"
             "    try:\n        importlib.import_module(n)\n"
             "    except Exception:\n        missing.append(n)\nprint(' '.join(missing))")
    done = subprocess.run([python, "-c", check, *names], capture_output=True, text=True)
    return done.stdout.split() if done.returncode == 0 else list(names)


def _fp8_interface(python: str) -> Optional[str]:
    """None when ``benchmarks/fp8.py`` takes ``--only``, else why the K steps skip.

    Asked through ``--help`` with CUDA hidden, so that a version without the flag, which
    would start its whole benchmark, sees no GPU and returns at once.
    """
    try:
        done = subprocess.run([python, str(ROOT / "benchmarks" / "fp8.py"), "--help"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    except subprocess.TimeoutExpired:
        return "benchmarks/fp8.py --help did not answer within 60 s"
    if "--only" not in done.stdout + done.stderr:
        return "benchmarks/fp8.py does not accept --only yet (its --help does not list it)"
    return None


def plan(ns, python: str, cuda: Optional[bool]) -> list[Step]:
    """The steps in their fixed order, those not asked for (``--steps``) or impossible
    marked skipped with the reason."""
    smoke = ["--smoke"] if ns.smoke else []
    interp = {"TRITON_INTERPRET": "1"} if ns.smoke else {}
    fp8_missing = None
    steps = []
    for name in ORDER:
        cap = ns.caps.get(name, SMOKE_CAP if ns.smoke else CAPS[name])
        step = Step(name, cap)
        if name == "env":
            step.command = [python, "-c", ENV_SCRIPT, "{tmp}/env.json"]
        elif name == "gpu-tests":
            step.command = [python, "-m", "pytest", "-m", "gpu", "-q", "-rs",
                            "-p", "no:cacheprovider"]
            if _missing_modules(python, ("pytest",)):
                step.skip_reason = f"pytest is not importable by {python}"
        elif name in FP8_GOALS:
            step.command = [python, "benchmarks/fp8.py", "--only", name, *smoke,
                            "--out-dir", "{tmp}"]
            # one autotune config for the Hopper kernel: the check has minutes, not hours
            step.env = {**interp, "DSV3LITE_QUICK_AUTOTUNE": "1"}
        elif name in ("M1", "M2"):
            budget = f"{max(cap * 0.6, 1):.0f}"  # rows not started by then are skipped
            step.command = [python, "benchmarks/train.py", "--only", name, *smoke,
                            "--budget", budget, "--out", "{tmp}"]
            if name == "M2" and not ns.smoke:
                step.command += ["--fp8-dims", "2048,1024"]  # the goal's d_model first
        else:
            step.command = [python, "benchmarks/robustness.py", "--chapters", "05,08",
                            "--seeds", "0", "--check-runs", "--out", "{tmp}/chapters.json"]
            for knob, value in CHAPTER_KNOBS.items():
                step.command += ["--setting-env", f"{knob}={value}"]
            step.fill = True
            if ns.smoke:
                step.skip_reason = "smoke run: the book build executes every chapter on the CPU"
            else:
                missing = _missing_modules(python, ("jupytext", "nbclient", "ipykernel"))
                if missing:
                    step.skip_reason = (f"{', '.join(missing)} not importable by {python}: "
                                        "the chapters cannot be executed there")
        if ns.steps and name not in ns.steps and name != "env":
            step.skip_reason = f"not among --steps {','.join(ns.steps)}"
        elif cuda is False and not ns.smoke and name != "env":
            step.skip_reason = "no CUDA device here (use --smoke for the CPU check)"
        elif name in FP8_GOALS and step.skip_reason is None:
            if fp8_missing is None:
                fp8_missing = _fp8_interface(python) or ""
            step.skip_reason = fp8_missing or None
        steps.append(step)
    return steps


def goals_table(records: dict, out: Path) -> list[tuple[str, str, Optional[str]]]:
    """The goals of ``benchmarks/summary.py`` from this run's merged fp8 and train JSON."""
    spec = importlib.util.spec_from_file_location("bench_summary",
                                                  ROOT / "benchmarks" / "summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    merged = {}
    for group in ("fp8", "train"):
        path = out / f"gpu-check-{group}.json"
        merged[group] = (json.loads(path.read_text()).get("merged") if path.exists()
                         else None)
    try:
        return summary.goals(merged["fp8"], merged["train"])
    except Exception as exc:  # a part with an unexpected shape must not lose the summary
        return [("goals table", "", f"could not be computed: {type(exc).__name__}: {exc}")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="the same steps on the CPU: tiny shapes, Triton interpreter")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"total seconds (default {DEFAULT_BUDGET:.0f}, with --smoke "
                             f"{SMOKE_BUDGET:.0f}); a step whose cap exceeds what is left "
                             "is skipped")
    parser.add_argument("--steps", default="",
                        help=f"comma-separated subset of {','.join(ORDER)} (env always runs)")
    parser.add_argument("--cap", action="append", default=[], metavar="STEP=SECONDS",
                        help="override one step's cap (repeatable)")
    parser.add_argument("--out", default=None, help="default: $OUT, else benchmarks/results")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for the steps (default: this one)")
    ns = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    if ns.budget is None:
        ns.budget = SMOKE_BUDGET if ns.smoke else DEFAULT_BUDGET
    if ns.budget < 0:
        return fail(f"--budget={ns.budget} is invalid: must be >= 0 seconds")
    ns.steps = [s.strip() for s in ns.steps.split(",") if s.strip()]
    unknown = [s for s in ns.steps if s not in ORDER]
    if unknown:
        return fail(f"--steps={','.join(ns.steps)} is invalid: {','.join(unknown)} is not "
                    f"one of {','.join(ORDER)}")
    ns.caps = {}
    for item in ns.cap:
        name, _, seconds = item.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if name not in CAPS or value <= 0:
            return fail(f"--cap={item!r} is invalid: use STEP=SECONDS with STEP one of "
                        f"{','.join(ORDER)} and SECONDS > 0")
        ns.caps[name] = value

    out = out_dir(ns.out)
    runner = Runner(out, ns.budget, smoke=ns.smoke)
    runner._say(f"gpu-check{' --smoke' if ns.smoke else ''}: {ns.python}, budget "
                f"{ns.budget:.0f} s, JSON into {out}\n")
    env_step, *rest = plan(ns, ns.python, cuda=None)
    env_record = runner.run(env_step)
    env_info = env_record.get("result") if isinstance(env_record.get("result"), dict) else {}
    cuda = bool(env_info.get("cuda_available")) if env_record["status"] == "ok" else None
    if cuda is False and not ns.smoke:
        runner._say("gpu-check: no CUDA device here, nothing to measure "
                    "(make gpu-check SMOKE=1 runs the CPU check)\n")
    for step in plan(ns, ns.python, cuda)[1:]:
        runner.run(step)

    records = runner.records
    bad = [n for n, r in records.items() if r["status"] in ("failed", "timeout")]
    goals = goals_table(records, out)
    summary = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
               "smoke": ns.smoke, "device": env_info.get("device"),
               "python": ns.python, "budget_s": ns.budget,
               "total_s": round(time.monotonic() - runner.start, 1),
               "steps": [{k: r.get(k) for k in ("step", "status", "seconds", "cap_s", "reason")}
                         for r in records.values()],
               "goals": [{"goal": g, "target": t, "measured": m} for g, t, m in goals],
               "failed": bad, "exit_status": 1 if bad else 0}
    (out / "gpu-check-summary.json").write_text(json.dumps(summary, indent=1))

    lines = ["", f"gpu-check{' (smoke: CPU, not performance)' if ns.smoke else ''} on "
             f"{summary['device']}: {summary['total_s']:.0f} s of {ns.budget:.0f}",
             "| step | status | seconds | cap | note |", "|---|---|---|---|---|"]
    for r in records.values():
        note = r.get("reason") or (f"exit {r['returncode']}" if r["status"] != "ok" else "")
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']:.1f} | {r['cap_s']:.0f} "
                     f"| {note} |")
    lines += ["", "| goal | target | measured |", "|---|---|---|"]
    lines += [f"| {g} | {t} | {m or 'not measured'} |" for g, t, m in goals]
    lines += ["", f"JSON in {out}: " + ", ".join(sorted(p.name for p in out.glob("gpu-check*")))]
    runner._say("\n".join(lines) + "\n")
    shutil.rmtree(runner.tmp, ignore_errors=True)  # the children's own copies, now merged
    return summary["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
