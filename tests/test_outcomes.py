"""dsv3lite.outcomes (the chapters' asserted outcomes) and benchmarks/robustness.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3lite.outcomes import OutcomeError, expect, knob

ROOT = Path(__file__).resolve().parents[1]


def test_knob_default_and_override(monkeypatch):
    monkeypatch.delenv("DSV3LITE_STEPS", raising=False)
    assert knob("steps", 80) == 80
    monkeypatch.setenv("DSV3LITE_STEPS", "120")
    assert knob("steps", 80) == 120 and isinstance(knob("steps", 80), int)
    monkeypatch.setenv("DSV3LITE_LR", "0.5")
    assert knob("lr", 1e-3) == 0.5
    monkeypatch.setenv("DSV3LITE_STEPS", "many")
    with pytest.raises(ValueError, match="DSV3LITE_STEPS='many'.*int"):
        knob("steps", 80)


def test_expect_asserts_and_returns_the_margin(monkeypatch):
    monkeypatch.delenv("DSV3LITE_OUTCOMES", raising=False)
    monkeypatch.delenv("DSV3LITE_KEEP_GOING", raising=False)
    assert expect("a", 1.0, "<", 4.0) == pytest.approx(0.75)
    assert expect("b", 6.0, ">", 4.0) == pytest.approx(0.5)
    assert expect("c", 0.5, ">=", 0.0) == pytest.approx(0.5)  # bound 0: absolute
    with pytest.raises(OutcomeError, match="d: expected 5 < 4"):
        expect("d", 5.0, "<", 4.0)
    with pytest.raises(ValueError, match="op='=='"):
        expect("e", 1.0, "==", 1.0)
    with pytest.raises(ValueError, match="finite"):
        expect("f", float("nan"), "<", 1.0)


def test_expect_records_and_keeps_going(monkeypatch, tmp_path):
    path = tmp_path / "outcomes.jsonl"
    monkeypatch.setenv("DSV3LITE_OUTCOMES", str(path))
    monkeypatch.setenv("DSV3LITE_KEEP_GOING", "1")
    assert expect("held", 1.0, "<", 2.0) == pytest.approx(0.5)
    assert expect("failed", 3.0, "<", 2.0) == pytest.approx(-0.5)  # no raise
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["name"], r["held"]) for r in records] == [("held", True), ("failed", False)]
    assert records[1]["value"] == 3.0 and records[1]["bound"] == 2.0


FAKE_CHAPTER = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# A chapter with two outcomes

```{code-cell} ipython3
import os
from dsv3lite.outcomes import expect, knob
seed = knob("seed", 0)
expect("seed below 1", seed, "<", 1)
expect("threads", int(os.environ.get("OMP_NUM_THREADS", "2")), ">=", 1)
```
"""


def test_robustness_script_tabulates_every_run(tmp_path):
    """Three runs (two seeds, one more setting); one outcome fails in one run."""
    pytest.importorskip("nbclient")  # the script executes notebooks (not in floor-test)
    (tmp_path / "nb").mkdir()
    (tmp_path / "nb" / "01_fake.md").write_text(FAKE_CHAPTER)
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "robustness.py"), "--notebooks",
         str(tmp_path / "nb"), "--chapters", "01", "--seeds", "0,1",
         "--settings", "native,1t", "--out", str(out), "--check"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # --check: one failure
    assert proc.stdout.strip().splitlines()[-1] == "robustness: 5 passed, 1 failed"
    result = json.loads(out.read_text())
    rows = {r["outcome"]: r for r in result["outcomes"]}
    assert rows["seed below 1"]["runs"] == 3 and rows["seed below 1"]["held"] == 2
    assert rows["seed below 1"]["worst_run"] == "native seed 1"
    assert rows["threads"]["held"] == 3
    threads = {(r["setting"], r["seed"]): r["records"][1]["value"] for r in result["runs"]}
    assert threads[("1t", 0)] == 1.0  # the setting reached the kernel
    assert result["machine"]["torch"] and result["settings"]["1t"] == {"OMP_NUM_THREADS": "1"}
    merged = tmp_path / "merged.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "robustness.py"), "--merge", str(out),
         str(out), "--out", str(merged)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {r["outcome"]: r for r in json.loads(merged.read_text())["outcomes"]}
    assert rows["seed below 1"]["runs"] == 6 and rows["seed below 1"]["held"] == 4


def test_robustness_script_names_a_bad_argument():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "robustness.py"), "--settings", "fast"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--settings='fast': unknown ['fast']" in proc.stderr
