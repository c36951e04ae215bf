"""The command-line front door, ``python -m dsv3lite``, and what a fresh install ships."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import dsv3lite
from dsv3lite.__main__ import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def test_front_door_lists_every_command_with_one_line(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("train", "generate", "pipeline", "grpo", "data"):
        assert re.search(rf"^  {name}\s+\S", out, re.M), name
    assert list(COMMANDS) == ["train", "generate", "pipeline", "grpo", "data"]


def test_version_is_the_projects(capsys):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert dsv3lite.__version__ == version
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dsv3lite {version}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_keeps_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"dsv3lite.{command}" in capsys.readouterr().out  # the command's own parser


def test_unknown_command_is_a_clear_error(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train, generate, pipeline, grpo, data" in err


def test_a_fresh_install_has_the_front_door_and_the_type_marker(tmp_path):
    """``pip install .`` (without dependencies, into a folder) ships ``__main__`` and
    ``py.typed``, and ``python -m dsv3lite --version`` runs from there."""
    source, target = tmp_path / "src", tmp_path / "site"  # a copy: the build writes build/
    shutil.copytree(ROOT / "dsv3lite", source / "dsv3lite",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                            "--no-build-isolation", "--target", str(target), str(source)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    assert (target / "dsv3lite" / "py.typed").is_file()
    assert (target / "dsv3lite" / "__main__.py").is_file()
    run = subprocess.run([sys.executable, "-m", "dsv3lite", "--version"], cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == f"dsv3lite {dsv3lite.__version__}"
    assert "site" in subprocess.run(
        [sys.executable, "-c", "import dsv3lite; print(dsv3lite.__file__)"], cwd=tmp_path,
        env={"PYTHONPATH": str(target)}, capture_output=True, text=True).stdout
