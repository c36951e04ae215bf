"""Do the book's asserted outcomes hold on other machines? Execute the training chapters
under several arithmetic settings and seeds and tabulate every asserted outcome.

    python benchmarks/robustness.py                              # the full sweep
    python benchmarks/robustness.py --chapters 03,05 --seeds 0,1 --settings native,avx2-1t
    python benchmarks/robustness.py --chapters 03 --setting-env OMP_NUM_THREADS=1 --check

A seed fixes data and initial weights, not arithmetic. The settings change the low bits
the way another machine would:

- ``ATEN_CPU_CAPABILITY`` (``default``, ``avx2``, ``avx512``): PyTorch's vectorized kernels;
- ``MKL_CBWR`` (``COMPATIBLE``, ``AVX2``, ...): MKL's matmul code path;
- ``OMP_NUM_THREADS`` (1, 2): how reductions are split.

Each chapter reads its seed and step counts with ``dsv3lite.outcomes.knob`` and states its
outcomes with ``dsv3lite.outcomes.expect``; this script sets ``DSV3LITE_SEED``,
``DSV3LITE_OUTCOMES`` and ``DSV3LITE_KEEP_GOING=1`` and executes the chapter (a MyST
notebook) in a fresh kernel. The runs form a star: every seed under the first setting,
and the first seed under every other setting. The table has one row per asserted outcome:
its value in the default run, how many runs it held in, and its smallest margin (relative
to the bound) with the run that gave it. The JSON under ``benchmarks/results/`` has the
machine, the versions and every raw record.

``--check`` exits non-zero when any outcome failed (CI uses it for its portability run).
``--merge A.json B.json ...`` reprints one table from earlier results files (for example
one sweep per chapter) and, with ``--out``, writes them as one file.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
RESULTS = ROOT / "benchmarks" / "results"

# The chapters whose outcomes come from training or sampling.
TRAINING_CHAPTERS = ["01", "02", "03", "04", "05", "07", "08"]

SETTINGS = {
    "native": {},
    "avx2-1t": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "OMP_NUM_THREADS": "1"},
    "compat-1t": {"MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"},
    "default-2t": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE",
                   "OMP_NUM_THREADS": "2"},
    "1t": {"OMP_NUM_THREADS": "1"},
}


def chapter_path(prefix: str, folder: Path = NOTEBOOKS) -> Path:
    found = sorted(folder.glob(f"{prefix}_*.md"))
    if len(found) != 1:
        raise SystemExit(f"--chapters: {prefix!r} matches {len(found)} notebooks in "
                         f"{folder} (expected exactly one)")
    return found[0]


def execute(path: Path) -> None:
    """Run one MyST notebook top to bottom in a fresh kernel (the caller sets the env)."""
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(path)
    client = NotebookClient(nb, timeout=1800, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()


def run_one(chapter: str, setting: str, env_extra: dict, seed: int | None,
            workdir: Path, folder: Path = NOTEBOOKS) -> dict:
    """Execute one chapter in a subprocess; returns its records, time and any error."""
    path = chapter_path(chapter, folder)
    outcomes = workdir / f"{chapter}-{setting}-seed{seed}.jsonl"
    outcomes.unlink(missing_ok=True)
    env = dict(os.environ, **env_extra, DSV3LITE_OUTCOMES=str(outcomes),
               DSV3LITE_KEEP_GOING="1", MPLBACKEND="Agg")
    if seed is not None:
        env["DSV3LITE_SEED"] = str(seed)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--execute", str(path)], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    records = ([json.loads(line) for line in outcomes.read_text().splitlines()]
               if outcomes.exists() else [])
    error = None if proc.returncode == 0 else (proc.stdout + proc.stderr)[-3000:]
    return {"chapter": chapter, "setting": setting, "env": env_extra, "seed": seed,
            "seconds": round(seconds, 1), "records": records, "error": error}


def machine() -> dict:
    """The CPU, its vector ISA, and the versions that set the arithmetic."""
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
        isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    except OSError:
        isa = "unknown"
    return {"cpu": cpu, "isa": isa, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "platform": platform.platform()}


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (chapter, outcome): runs, how many held, the default and worst values."""
    rows: dict[tuple, dict] = {}
    for run in runs:
        for rec in run["records"]:
            key = (run["chapter"], rec["name"])
            row = rows.setdefault(key, {"chapter": run["chapter"], "outcome": rec["name"],
                                        "op": rec["op"], "runs": 0, "held": 0,
                                        "value": None, "bound": None, "worst_margin": None,
                                        "worst_run": None, "worst_value": None,
                                        "worst_bound": None})
            row["runs"] += 1
            row["held"] += bool(rec["held"])
            if row["value"] is None:  # the first run is the default one
                row["value"], row["bound"] = rec["value"], rec["bound"]
            if row["worst_margin"] is None or rec["margin"] < row["worst_margin"]:
                row.update(worst_margin=rec["margin"], worst_value=rec["value"],
                           worst_bound=rec["bound"],
                           worst_run=f"{run['setting']} seed {run['seed']}")
    return list(rows.values())


def print_table(rows: list[dict], runs: list[dict]) -> None:
    """One line per outcome; a chapter that did not run to the end shows its error."""
    print()
    print(f"{'ch':<3} {'outcome':<62} {'held':>7} {'value':>9} {'bound':>9} "
          f"{'worst margin':>13}  worst run")
    for r in rows:
        print(f"{r['chapter']:<3} {r['outcome'][:62]:<62} {r['held']:>3}/{r['runs']:<3} "
              f"{r['value']:>9.4g} {r['op']:>1}{r['bound']:>8.4g} "
              f"{100 * r['worst_margin']:>12.1f}%  {r['worst_run']}")
    for run in runs:
        if run["error"]:
            print(f"\nchapter {run['chapter']} ({run['setting']}, seed {run['seed']}) "
                  f"failed to run:\n{run['error'][-1500:]}")


def merge(paths: list[Path], out: Path | None) -> int:
    """One table (and, with ``out``, one file) from several results files."""
    parts = [json.loads(Path(path).read_text()) for path in paths]
    runs = [run for part in parts for run in part["runs"]]
    rows = summarize(runs)
    print_table(rows, runs)
    if out is not None and str(out) != "-":
        chapters = sorted({run["chapter"] for run in runs})
        payload = {"machine": parts[0]["machine"], "merged_from": [p.name for p in paths],
                   "date": max(part["date"] for part in parts), "chapters": chapters,
                   "settings": {k: v for part in parts for k, v in part["settings"].items()},
                   "wall_seconds": round(sum(part["wall_seconds"] for part in parts), 1),
                   "outcomes": rows, "runs": runs}
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
        tmp.replace(out)
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chapters", default=",".join(TRAINING_CHAPTERS),
                   help="comma-separated chapter numbers (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2,3,4",
                   help="seeds, each run under the first setting (default: %(default)s)")
    p.add_argument("--settings", default="native,avx2-1t,compat-1t",
                   help=f"arithmetic settings, from {sorted(SETTINGS)}; the first seed "
                        "runs under each (default: %(default)s)")
    p.add_argument("--setting-env", action="append", default=[], metavar="VAR=VALUE",
                   help="instead of --settings: one custom setting from these variables")
    p.add_argument("--jobs", type=int, default=1,
                   help="chapters executed at once (default 1; 2 on a 2-core machine "
                        "only with one-thread settings)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if any outcome failed or any chapter did not run")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file (default: benchmarks/results/robustness-cpu-<date>.json, "
                        "with -chNN-NN for a subset of the chapters; '-' writes none)")
    p.add_argument("--check-runs", action="store_true",
                   help="exit 1 if any chapter did not run to the end (failed outcomes "
                        "are reported, not fatal: for shortened runs)")
    p.add_argument("--notebooks", type=Path, default=NOTEBOOKS,
                   help="folder of the chapters (default: the book's notebooks/)")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="tabulate these results files together instead of running")
    p.add_argument("--execute", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.execute:
        execute(args.execute)
        return 0
    if args.merge:
        return merge(args.merge, args.out)

    chapters = [c.strip() for c in args.chapters.split(",") if c.strip()]
    for c in chapters:
        chapter_path(c, args.notebooks)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds={args.seeds!r}: expected comma-separated integers")
    if args.setting_env:
        custom = {}
        for item in args.setting_env:
            if "=" not in item:
                p.error(f"--setting-env={item!r}: expected VAR=VALUE")
            k, v = item.split("=", 1)
            custom[k] = v
        settings = {"custom": custom}
    else:
        names = [s.strip() for s in args.settings.split(",") if s.strip()]
        unknown = [s for s in names if s not in SETTINGS]
        if unknown or not names:
            p.error(f"--settings={args.settings!r}: unknown {unknown}; "
                    f"choose from {sorted(SETTINGS)}")
        settings = {s: SETTINGS[s] for s in names}
    if not seeds:
        p.error("--seeds: give at least one seed")

    plan = []
    first_setting = next(iter(settings))
    for c in chapters:
        for seed in seeds:
            plan.append((c, first_setting, settings[first_setting], seed))
        for name, env in list(settings.items())[1:]:
            plan.append((c, name, env, seeds[0]))

    workdir = Path(tempfile.mkdtemp(prefix="dsv3lite-robustness-"))
    print(f"{len(plan)} chapter runs, {args.jobs} at a time; outcomes in {workdir}")
    runs = []
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_one, c, s, env, seed, workdir, args.notebooks):
                   (c, s, seed)
                   for c, s, env, seed in plan}
        for fut in concurrent.futures.as_completed(futures):
            run = fut.result()
            runs.append(run)
            failed = [r["name"] for r in run["records"] if not r["held"]]
            status = "ERROR" if run["error"] else (f"{len(failed)} failed" if failed else "ok")
            print(f"  chapter {run['chapter']} {run['setting']:>10} seed {run['seed']}: "
                  f"{run['seconds']:6.1f} s, {len(run['records'])} outcomes, {status}",
                  flush=True)
            for name in failed:
                print(f"      failed: {name}")
    order = {key[:2] + (key[3],): i for i, key in enumerate(plan)}
    runs.sort(key=lambda r: order[(r["chapter"], r["setting"], r["seed"])])
    rows = summarize(runs)
    print_table(rows, runs)
    total = time.perf_counter() - start
    print(f"\n{len(runs)} runs in {total / 60:.1f} min")

    if str(args.out) != "-":
        part = "" if chapters == TRAINING_CHAPTERS else "-ch" + "-".join(chapters)
        stamp = f"{datetime.date.today():%Y%m%d}{part}"
        out = args.out or RESULTS / f"robustness-cpu-{stamp}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "settings": settings, "seeds": seeds, "chapters": chapters,
                   "wall_seconds": round(total, 1), "outcomes": rows, "runs": runs}
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
        tmp.replace(out)
        print(f"wrote {out}")
    held = sum(r["held"] for r in rows)
    failed = sum(r["runs"] - r["held"] for r in rows) + sum(bool(r["error"]) for r in runs)
    print(f"robustness: {held} passed, {failed} failed")
    did_not_run = sum(bool(r["error"]) for r in runs)
    return 1 if (args.check and failed) or (args.check_runs and did_not_run) else 0


if __name__ == "__main__":
    sys.exit(main())
