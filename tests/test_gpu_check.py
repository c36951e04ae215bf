"""benchmarks/gpu_check.py, the script behind `make gpu-check`: its CPU smoke end to end
(so `make test` runs the GPU script on every change), the Makefile in a copy of the
checkout with no .venv, and the step runner's statuses, caps and budget."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu_check",
                                                  ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def _fp8_takes_only() -> bool:
    return gpu_check._fp8_interface(sys.executable) is None


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return {**env, **extra}


def test_smoke_runs_every_step_and_writes_its_json(tmp_path):
    """The whole script on the CPU: every step recorded with the status it must have."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke"], cwd=ROOT,
                          env=_env(OUT=str(out)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.rglob("*"))
    assert files == ["gpu-check-env.json", "gpu-check-extras.json", "gpu-check-fp8.json",
                     "gpu-check-summary.json", "gpu-check-train.json", "gpu-check.log"]
    assert len(files) <= 8  # what the device tool brings back from $OUT
    summary = json.loads((out / "gpu-check-summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert list(status) == list(gpu_check.ORDER)
    reasons = {s["step"]: s["reason"] for s in summary["steps"]}
    fp8_expected = "ok" if "--only" not in (reasons["K5"] or "") else "skipped"
    if fp8_expected == "skipped":  # only while benchmarks/fp8.py lacks its --only interface
        assert not _fp8_takes_only() or "--only" in reasons["K5"]
    assert status == {"env": "ok", "gpu-tests": "ok", **dict.fromkeys(gpu_check.FP8_GOALS,
                      fp8_expected), "M1": "ok", "M2": "ok", "extras": "skipped"}
    assert summary["smoke"] and summary["exit_status"] == 0 and summary["failed"] == []
    groups = {g: json.loads((out / f"gpu-check-{g}.json").read_text())
              for g in ("env", "fp8", "train", "extras")}
    assert groups["env"]["steps"]["env"]["result"]["cuda_available"] is False
    assert "skipped" in groups["env"]["steps"]["gpu-tests"]["output_tail"]  # pytest -m gpu
    train = groups["train"]["merged"]
    assert [r["variant"] for r in train["rows"]] == [
        "ours (no MTP) compiled", "transformers compiled", "ours d=128 bf16", "ours d=128 fp8"]
    assert all(len(r["step_s"]) == 1 for r in train["rows"])  # the 1-step rows
    assert train["ratios"]["M1_ours_vs_transformers_compiled"] > 0
    assert train["ratios"]["M2_fp8_vs_bf16"]["128"] > 0
    goals = {g["goal"].split()[0]: g["measured"] for g in summary["goals"]}
    assert goals["M1"] is not None and goals["M2"].startswith("128: ")
    if fp8_expected == "ok":
        assert set(groups["fp8"]["steps"]) == set(gpu_check.FP8_GOALS)
        assert all(isinstance(r["result"], dict) for r in groups["fp8"]["steps"].values())
    assert "| M1 | ok |" in done.stdout  # the printed table


def _copy_checkout(tmp_path: Path) -> Path:
    """The files git would send to the GPU machine (tracked, untracked-not-ignored): no .venv."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                            "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    copy = tmp_path / "checkout"
    for name in filter(None, files.stdout.split("\0")):
        source = ROOT / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    assert not (copy / ".venv").exists()
    return copy


def _python3_without(tmp_path: Path, module: str) -> Path:
    """A folder holding a `python3` (this interpreter) that cannot import ``module``."""
    blocker = tmp_path / f"block-{module}" / module
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(f"raise ImportError('no {module} here')\n")
    folder = tmp_path / f"bin-without-{module}"
    folder.mkdir()
    python = folder / "python3"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={blocker.parent}${{PYTHONPATH:+:$PYTHONPATH}} "
                      f"exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    assert subprocess.run([str(python), "-c", f"import {module}"],
                          capture_output=True).returncode != 0
    return folder


def test_make_gpu_check_in_a_copy_without_venv_makes_none(tmp_path):
    """`make gpu-check SMOKE=1 PYTHON=<a python with torch, triton, pytest>` in a checkout
    with no .venv: no venv and no pip, and the JSON lands in $OUT."""
    copy = _copy_checkout(tmp_path)
    out = tmp_path / "out"
    done = subprocess.run(["make", "gpu-check", "SMOKE=1", f"PYTHON={sys.executable}",
                           "GPU_CHECK_ARGS=--steps env,M1"], cwd=copy,
                          env=_env(OUT=str(out)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (copy / ".venv").exists() and "pip" not in done.stdout
    summary = json.loads((out / "gpu-check-summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status["env"] == status["M1"] == "ok" and status["M2"] == "skipped"
    train = json.loads((out / "gpu-check-train.json").read_text())
    assert train["steps"]["M1"]["result"]["rows"]  # the child ran from the copy
    assert f"using PYTHONPATH={copy} {sys.executable}" in done.stdout  # the copy's package


def test_the_gpu_machines_python3_is_used_as_it_is(tmp_path):
    """As on the GPU machine: no .venv, a plain `make gpu-check`, and the `python3` on PATH
    has torch and triton but no pytest. That python3 runs the check: no venv, no pip, and
    only the GPU-tests step is skipped for want of pytest."""
    copy = _copy_checkout(tmp_path)
    folder = _python3_without(tmp_path, "pytest")
    env = _env(OUT=str(tmp_path / "out"), PATH=f"{folder}{os.pathsep}{os.environ['PATH']}")
    plan = subprocess.run(["make", "-n", "gpu-check"], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "-m venv" not in plan.stdout and "pip" not in plan.stdout, plan.stdout
    done = subprocess.run(["make", "gpu-check", "SMOKE=1", "GPU_CHECK_ARGS=--steps env"],
                          cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"using PYTHONPATH={copy} python3" in done.stdout
    assert not (copy / ".venv").exists()
    ns = type("NS", (), {"smoke": False, "steps": [], "caps": {}})()
    tests_step = gpu_check.plan(ns, str(folder / "python3"), cuda=True)[1]
    assert tests_step.name == "gpu-tests" and "pytest is not importable" in tests_step.skip_reason


def test_without_a_python_that_has_torch_it_stops_and_says_how(tmp_path):
    """No .venv and a python3 without torch: gpu-check installs nothing, exits 2, and says
    to run `make install` or to name a python."""
    copy = _copy_checkout(tmp_path)
    folder = _python3_without(tmp_path, "torch")
    env = _env(PATH=f"{folder}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["make", "gpu-check", "SMOKE=1"], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and not (copy / ".venv").exists()
    assert "cannot import torch and triton" in done.stderr
    assert "make gpu-check PYTHON=" in done.stderr and "benchmarks/gpu_check.py" not in done.stdout


def test_without_cuda_the_device_steps_skip_and_it_succeeds(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "gpu-check-summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert steps["env"]["status"] == "ok"
    assert all(s["status"] == "skipped" and "no CUDA" in s["reason"]
               for name, s in steps.items() if name != "env")


def test_runner_records_failure_timeout_and_budget(tmp_path):
    """A failing child is 'failed', one past its cap is killed with what it started and
    is 'timeout', and a step whose cap exceeds the budget left is 'skipped'; every
    record is in its group's file the moment the step ends."""
    runner = gpu_check.Runner(tmp_path, budget=30, echo=False)
    py = sys.executable
    ok = runner.run(gpu_check.Step("env", 10, [py, "-c",
                                               "import json,sys; json.dump({'a': 1}, "
                                               "open(sys.argv[1] + '/x.json', 'w'))", "{tmp}"]))
    assert ok["status"] == "ok" and ok["result"] == {"a": 1}
    on_disk = json.loads((tmp_path / "gpu-check-env.json").read_text())
    assert on_disk["steps"]["env"]["result"] == {"a": 1}
    bad = runner.run(gpu_check.Step("K1", 10, [py, "-c", "print('boom'); raise SystemExit(3)"]))
    assert bad["status"] == "failed" and bad["returncode"] == 3 and "boom" in bad["output_tail"]
    assert json.loads((tmp_path / "gpu-check-fp8.json").read_text())["steps"]["K1"]["status"] \
        == "failed"
    marker = tmp_path / "grandchild"
    sleeper = (f"import subprocess,sys; subprocess.Popen([sys.executable, '-c', "
               f"\"import time; time.sleep(3); open(r'{marker}', 'w')\"]); time_ = "
               f"__import__('time'); print('started', flush=True); time_.sleep(60)")
    begun = time.monotonic()
    slow = runner.run(gpu_check.Step("K3", 1, [py, "-c", sleeper]))
    assert slow["status"] == "timeout" and time.monotonic() - begun < 10
    assert "started" in slow["output_tail"]
    time.sleep(4)
    assert not marker.exists()  # the grandchild was killed with its parent
    over = runner.run(gpu_check.Step("M1", 1000, [py, "-c", "raise SystemExit(1)"]))
    assert over["status"] == "skipped" and "exceeds" in over["reason"]


def test_merge_concatenates_lists_and_keeps_the_first_scalar():
    merged = gpu_check.merge([{"device": "H100", "quant": [1], "ratios": {"a": None, "b": 2}},
                              {"device": "other", "quant": [2], "gemm": [3],
                               "ratios": {"a": 1, "b": None}}])
    assert merged == {"device": "H100", "quant": [1, 2], "gemm": [3],
                      "ratios": {"a": 1, "b": 2}}


def test_bad_options_name_the_option(capsys):
    assert gpu_check.main(["--steps", "K1,K9"]) == 2
    assert "--steps=K1,K9 is invalid: K9 is not one of env," in capsys.readouterr().err
    assert gpu_check.main(["--cap", "M1=soon"]) == 2
    assert "--cap='M1=soon' is invalid" in capsys.readouterr().err
    assert gpu_check.main(["--budget", "-1"]) == 2
    assert "--budget=-1.0 is invalid" in capsys.readouterr().err


def test_default_caps_fit_the_default_budget():
    """Every step but the optional extras fits even if each needs its whole cap."""
    assert sum(v for k, v in gpu_check.CAPS.items() if k != "extras") <= gpu_check.DEFAULT_BUDGET
    assert set(gpu_check.CAPS) == set(gpu_check.ORDER) == set(gpu_check.GROUP)


def test_extras_executes_chapters_5_and_8_in_the_time_left(tmp_path):
    """On a GPU machine with jupyter the extras step runs the two chapters, shortened by
    their knobs, and takes whatever the budget has left; without jupyter, or in the
    smoke run, it is skipped and says why."""
    pytest.importorskip("nbclient")  # jupyter, to execute the chapters (not in floor-test)
    ns = type("NS", (), {"smoke": False, "steps": [], "caps": {}})()
    extras = gpu_check.plan(ns, sys.executable, cuda=True)[-1]
    assert extras.name == "extras" and extras.skip_reason is None and extras.fill
    command = " ".join(extras.command)
    assert "benchmarks/robustness.py --chapters 05,08" in command and "--check-runs" in command
    assert "DSV3LITE_STEPS=300" in command and "DSV3LITE_BASE_STEPS=200" in command
    no_jupyter = tmp_path / "python"  # an interpreter that cannot import jupytext
    no_jupyter.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    no_jupyter.chmod(0o755)
    skipped = gpu_check.plan(ns, str(no_jupyter), cuda=True)[-1]
    assert "jupytext" in skipped.skip_reason and "cannot be executed" in skipped.skip_reason
    ns.smoke = True
    assert "smoke run" in gpu_check.plan(ns, sys.executable, cuda=False)[-1].skip_reason
    runner = gpu_check.Runner(tmp_path / "out", budget=40, echo=False)
    filled = runner.run(gpu_check.Step("extras", 10, [sys.executable, "-c", "pass"], fill=True))
    assert filled["status"] == "ok" and 30 < filled["cap_s"] <= 35  # all that was left, less 5
