"""Dependency floors: pyproject.toml and the import-time check say the same, and an old
install gets a clear message instead of an AttributeError deep in a forward pass."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from dsv3lite import versions

ROOT = Path(__file__).resolve().parents[1]


def _floor(requirements: list[str], package: str) -> str:
    spec = next(r for r in requirements if re.match(rf"{package}\b", r))
    return re.search(r">=\s*([\d.]+)", spec).group(1)


def test_floors_are_those_of_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _floor(project["dependencies"], "torch") == versions.TORCH_FLOOR
    assert _floor(project["optional-dependencies"]["hf"], "transformers") \
        == versions.TRANSFORMERS_FLOOR


def test_the_installed_torch_meets_the_floor_and_so_does_the_gpu_machines():
    versions.check_torch()  # this environment
    versions.check_torch("2.11.0+cu130")  # the lent GPU machine's (performance.md)


@pytest.mark.parametrize("installed", ["2.8.0", "2.4.1+cpu", "1.13.1"])
def test_an_older_torch_is_refused_with_both_versions(installed):
    with pytest.raises(ImportError, match=rf"needs torch>={versions.TORCH_FLOOR}, but torch "
                                          rf"{re.escape(installed)} is installed"):
        versions.check_torch(installed)


def test_an_older_transformers_is_refused_with_the_extra_named():
    with pytest.raises(ImportError, match=r"transformers>=5.0, but transformers 4.57.1 .*\[hf\]"):
        versions.check_transformers("4.57.1")
    versions.check_transformers("5.0.0")


def test_parse_version():
    assert versions.parse_version("2.9.1+cpu") == (2, 9, 1)
    assert versions.parse_version("5.0.0rc1") == (5, 0, 0)
    assert versions.parse_version("2.10") > versions.parse_version("2.9.1")
    with pytest.raises(ValueError, match="version='abc' is invalid"):
        versions.parse_version("abc")


def test_import_fails_at_once_on_an_old_torch(tmp_path):
    """``import dsv3lite`` with a torch that reports 2.8.0: one ImportError naming both."""
    fake = "import torch; torch.__version__ = '2.8.0'; import dsv3lite"
    done = subprocess.run([sys.executable, "-c", fake], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: dsv3lite needs torch>=2.10, but torch 2.8.0")
    assert torch.__version__ != "2.8.0"
