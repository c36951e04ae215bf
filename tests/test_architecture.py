"""The package's layers, checked (README, "Architecture").

The contracts live in ``pyproject.toml`` under ``[tool.importlinter]``: the layers from
``fp8`` and ``config | norm`` at the ground up to ``train | generate | pipeline | grpo``,
``fp8`` importing nothing else from the package, and no import cycle between sibling
modules. import-linter reads every import, those inside function bodies included, so an
import hidden in a function to dodge a loop breaks them as surely as one at the top.
The last tests ask that the package's own imports sit at the top of each file at all:
only a heavy optional dependency (Triton, transformers) may load on first use, and that
place says so with a comment.
"""

from __future__ import annotations

import ast
import io
import os
import re
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dsv3lite"
PYPROJECT = ROOT / "pyproject.toml"

LAZY_MODULES = ("dsv3lite", "triton", "transformers")
"""Top-level names whose import inside a function body needs the comment below."""
LAZY_MARK = "optional dependency"


# ---------------------------------------------------------------- import-linter contracts

def contract_names() -> dict[str, str]:
    """``{id: name}`` of the contracts in pyproject.toml (ids as the tests refer to them)."""
    text = PYPROJECT.read_text()
    pairs = re.findall(r'^id = "([^"]+)"\nname = "([^"]+)"$', text, flags=re.M)
    assert len(pairs) == text.count("[[tool.importlinter.contracts]]"), \
        "each contract in pyproject.toml needs an `id` line directly followed by `name`"
    return dict(pairs)


def lint_imports(root: Path) -> tuple[int, str, dict[str, str]]:
    """Run ``lint-imports`` on the package and config under ``root``.

    Returns:
        The exit status, the report, and ``{contract name: "KEPT" or "BROKEN"}``.
    """
    pytest.importorskip("importlinter", reason="import-linter is in requirements.txt")
    command = [sys.executable, "-c",
               "import sys; from importlinter.cli import lint_imports_command; "
               "sys.exit(lint_imports_command())",
               str(root / "pyproject.toml"), "--no-cache", "--no-logo"]
    # PYTHONPATH first, so the linter finds the package under `root`, not the installed one.
    env = dict(os.environ, PYTHONPATH=str(root))
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                            timeout=120)
    report = result.stdout + result.stderr
    status = dict(re.findall(r"^(.+) (KEPT|BROKEN)$", report, flags=re.M))
    return result.returncode, report, status


def test_import_contracts_hold():
    code, report, status = lint_imports(ROOT)
    names = contract_names()
    assert code == 0, f"lint-imports found broken import contracts:\n{report}"
    assert status == {name: "KEPT" for name in names.values()}, report


# Each case edits a copy of the package and names the contracts the edit must break.
UPWARD = "from ..model import Transformer\n"
VIOLATIONS = {
    "upward import at the top of fp8/linear.py": (
        "fp8/linear.py", "after_future", UPWARD,
        {"layers", "fp8-independent", "acyclic"}, "dsv3lite.fp8.linear -> dsv3lite.model"),
    "the package root imported in a function body of fp8": (
        "fp8/e4m3.py", "append",
        "\n\ndef _model():\n    from dsv3lite import Transformer\n    return Transformer\n",
        {"layers", "fp8-independent"}, "dsv3lite.fp8.e4m3 -> dsv3lite "),
    "a cycle hidden in a function body": (
        "pipeline/schedules.py", "append",
        "\n\ndef _timeline():\n    from .simulate import simulate\n    return simulate\n",
        {"acyclic"}, "No cycles are allowed in dsv3lite.pipeline."),
    "two modules of one layer importing each other": (
        "rope.py", "append",
        "\n\ndef _stream():\n    from .data import TokenStream\n    return TokenStream\n",
        {"layers"}, "dsv3lite.rope -> dsv3lite.data"),
    "a new module placed in no layer": (
        "extra.py", "create", "from .config import ModelArgs\n",
        {"layers"}, "dsv3lite.extra"),
}


@pytest.mark.parametrize("case", list(VIOLATIONS))
def test_import_contracts_catch(case, tmp_path):
    path, where, code_text, broken_ids, chain = VIOLATIONS[case]
    shutil.copytree(PACKAGE, tmp_path / "dsv3lite",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PYPROJECT, tmp_path / "pyproject.toml")
    target = tmp_path / "dsv3lite" / path
    if where == "create":
        target.write_text(code_text)
    elif where == "append":
        target.write_text(target.read_text() + code_text)
    else:  # just below `from __future__ import annotations`, i.e. among the top imports
        text = target.read_text()
        future = "from __future__ import annotations\n"
        assert future in text, f"{path} has no `{future.strip()}` line to insert after"
        target.write_text(text.replace(future, future + code_text, 1))

    code, report, status = lint_imports(tmp_path)
    names = contract_names()
    assert code != 0, f"{case}: lint-imports passed the edited copy:\n{report}"
    broken = {cid for cid, name in names.items() if status.get(name) == "BROKEN"}
    assert broken == broken_ids, f"{case}: broke {sorted(broken)}:\n{report}"
    assert chain in report, f"{case}: report does not name {chain!r}:\n{report}"


# ---------------------------------------------------------------- imports in function bodies

def lazy_imports(source: str, filename: str = "<source>") -> list[int]:
    """Lines of function-body imports of the package (or of Triton or transformers)
    that carry no ``optional dependency`` comment on their line or the line above."""
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lower()

    def needs_comment(node: ast.AST) -> bool:
        if isinstance(node, ast.ImportFrom):
            return node.level > 0 or (node.module or "").split(".")[0] in LAZY_MODULES
        if isinstance(node, ast.Import):
            return any(alias.name.split(".")[0] in LAZY_MODULES for alias in node.names)
        return False

    offenders = []

    def visit(node: ast.AST, in_function: bool) -> None:
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                  ast.Lambda))
        for child in ast.iter_child_nodes(node):
            if inside and needs_comment(child):
                lines = range(child.lineno - 1, child.end_lineno + 1)
                if not any(LAZY_MARK in comments.get(line, "") for line in lines):
                    offenders.append(child.lineno)
            visit(child, inside)

    visit(ast.parse(source, filename=filename), False)
    return sorted(offenders)


def test_no_package_import_in_a_function_body():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        for line in lazy_imports(source, str(path)):
            offenders.append(f"{path.relative_to(ROOT)}:{line}: "
                             f"{source.splitlines()[line - 1].strip()}")
    assert not offenders, (
        "imports inside function bodies: move them to the top of the file (an import "
        "that dodges a loop means the layers are wrong); only a heavy optional dependency "
        f"may load on first use, with a comment saying `{LAZY_MARK}`:\n"
        + "\n".join(offenders))


def test_lazy_import_check_flags_what_it_should():
    source = '''\
import dsv3lite.model
from .config import ModelArgs
import matplotlib


def f():
    from .model import Transformer
    import dsv3lite.moe
    from dsv3lite import fp8
    import triton
    from transformers import AutoModel
    import matplotlib.pyplot as plt
    import numpy as np
    "optional dependency"
    from .mla import MLA
    # optional dependency: Triton, loaded on first use
    from .kernels import fp8_gemm_triton
    from transformers import AutoConfig  # Optional dependency, loaded on first use
    # optional dependency: transformers
    from transformers import (
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
    )


class C:
    from .norm import RMSNorm

    def g(self):
        return lambda: __import__("os")

    def h(self):
        def inner():
            from ..data import prepare
        return inner
'''
    assert lazy_imports(source) == [7, 8, 9, 10, 11, 15, 34]
