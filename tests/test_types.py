"""The package is typed for its importers: py.typed, `__all__` in every public module,
full type hints on every public function and method, and mypy clean (pinned in
requirements.txt, configured in pyproject.toml)."""

import ast
import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import dsv3lite

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dsv3lite"


def _public_modules() -> list[str]:
    return ["dsv3lite"] + [m.name for m in pkgutil.walk_packages(dsv3lite.__path__, "dsv3lite.")
                           if not m.name.endswith("__main__")]


def test_the_package_ships_its_type_marker():
    assert (PACKAGE / "py.typed").exists()
    assert 'dsv3lite = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.parametrize("name", _public_modules())
def test_every_public_module_declares_all_and_each_name_exists(name):
    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), list), f"{name} has no __all__ list"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it lacks: {missing}"
    assert len(set(module.__all__)) == len(module.__all__), f"{name}.__all__ repeats a name"


def _unhinted(tree: ast.Module) -> list[str]:
    """Public functions and methods (and __init__) with a parameter or return left unhinted."""
    found = []

    def check(fn, owner=""):
        public = not fn.name.startswith("_") or fn.name in ("__init__", "__call__")
        if not public:
            return
        args = fn.args
        params = args.posonlyargs + args.args + args.kwonlyargs
        params = [a for a in params if a.arg not in ("self", "cls")]
        params += [a for a in (args.vararg, args.kwarg) if a is not None]
        bare = [a.arg for a in params if a.annotation is None]
        if fn.returns is None and fn.name != "__init__":
            bare.append("return")
        if bare:
            found.append(f"{owner}{fn.name}({', '.join(bare)}) line {fn.lineno}")

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            check(node)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    check(item, f"{node.name}.")
    return found


def test_every_public_function_and_method_has_type_hints():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        problems += [f"{path.relative_to(ROOT)}: {p}" for p in _unhinted(ast.parse(path.read_text()))]
    assert not problems, "no type hints on:\n" + "\n".join(problems)


def test_the_hint_check_finds_a_missing_hint():
    """The check above can fail: one unhinted parameter and one missing return are found."""
    tree = ast.parse("def f(x: int, y):\n    return x\n\nclass A:\n"
                     "    def g(self, z: int):\n        pass\n    def _h(self, w):\n        pass\n")
    assert _unhinted(tree) == ["f(y, return) line 1", "A.g(return) line 5"]


def test_mypy_finds_no_error_in_the_package(tmp_path):
    """mypy over dsv3lite/ with the settings in pyproject.toml ([tool.mypy])."""
    pytest.importorskip("mypy")
    done = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"),
                           "--no-error-summary"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "MYPY_FORCE_COLOR": "0"})
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
