"""Run a test file as a script in a child process under Triton's interpreter.

Triton reads ``TRITON_INTERPRET`` once, when it builds a module's kernels, so the kernel
tests run their interpreted half in a fresh process: the test file itself, as a script,
reading its inputs from a file and writing the kernels' outputs to another. Import it as
``from interpret import interpreted_outputs`` (pytest puts tests/ on the path).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["run_interpreted", "interpreted_outputs"]


def run_interpreted(script: str, *args: str, threads: Optional[int] = None,
                    timeout: int = 600) -> subprocess.CompletedProcess:
    """``python script *args`` with ``TRITON_INTERPRET=1`` (and ``OMP_NUM_THREADS`` when
    ``threads`` is given), this checkout first on the path; fails the test on an error."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    child = subprocess.run([sys.executable, script, *args], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout)
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-4000:]
    return child


def interpreted_outputs(script: str, inputs: Any, folder: Path,
                        threads: Optional[int] = None) -> Any:
    """Save ``inputs`` in ``folder``, run ``script inputs.pt outputs.pt`` interpreted, and
    return what it saved in outputs.pt."""
    torch.save(inputs, folder / "inputs.pt")
    run_interpreted(script, str(folder / "inputs.pt"), str(folder / "outputs.pt"),
                    threads=threads)
    return torch.load(folder / "outputs.pt")
