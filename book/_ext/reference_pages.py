"""Writes the book's API reference part: one page per public module of dsv3lite.

Run ``python book/_ext/reference_pages.py`` after adding, removing or renaming a module, or
after changing a package's ``__all__``; tests/test_reference.py fails while the pages or the
table of contents are out of date. A module's page holds its docstring and every name in
its ``__all__`` (Sphinx autodoc, in source order); a package's page lists what the package
re-exports, each name linked to the page of the module that defines it. The command-line
entry points (``__main__`` modules) are left out: ``python -m dsv3lite`` lists them.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = ROOT / "book" / "reference"
TOC = ROOT / "_toc.yml"
BEGIN = "  # >>> API reference: written by book/_ext/reference_pages.py, do not edit\n"
END = "  # <<< API reference\n"
INDEX = """# Reference: the dsv3lite package

Every public module of `dsv3lite`, one page each, generated from the docstrings by Sphinx's
autodoc: a module's page starts with what the module is for and then documents each name in
its `__all__` with its signature, in the order of the source. The chapters link here where
they first use a name.

The modules are listed from the ground up, in the layers of the README's "Architecture"
section: a module imports only from the layers below its own (`make test` checks this with
import-linter). `dsv3lite.fp8` sits beneath them all and imports nothing from the model.

The command-line entry points are `python -m dsv3lite` and its subcommands (`train`,
`generate`, `pipeline`, `grpo`, `data`); each has its own `--help`.

Type hints in the signatures name PyTorch types such as `torch.Tensor` and `torch.nn.Module`;
they are not links, since the book is built without fetching other projects' inventories.
"""


def public_modules() -> list[str]:
    """dsv3lite and its submodules, command-line entry points left out, sorted by layer."""
    sys.path.insert(0, str(ROOT))
    import dsv3lite

    names = ["dsv3lite"] + [m.name for m in pkgutil.walk_packages(dsv3lite.__path__, "dsv3lite.")
                            if not m.name.endswith("__main__")]
    order = _layer_order()

    def key(name: str) -> tuple:
        top = name.split(".")[1] if "." in name else ""
        return (order.get(top, -1), name)

    return sorted(names, key=key)


def _layer_order() -> dict[str, int]:
    """Each top-level module's layer from pyproject.toml's import-linter contract, ground first."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r'id = "layers".*?layers = \[(.*?)\]', text, flags=re.S).group(1)
    layers = re.findall(r'"([^"]+)"', block)
    return {mod.strip(): len(layers) - i for i, line in enumerate(layers)
            for mod in line.split("|")}


def page_text(name: str) -> str:
    """The MyST source of ``name``'s page: the module's docstring and the names of its
    ``__all__`` that it defines (autodoc), then the names it re-exports, each linked to
    the page of the module that defines it."""
    module = importlib.import_module(name)
    own, homes = [], []
    for export in module.__all__:
        home = _home(name, export, getattr(module, export))
        if home is None or home.rsplit(".", 1)[0] == name:
            own.append(export)
        else:
            homes.append(home)
    members = "".join(f"   :members: {', '.join(own)}\n" if own else "")
    text = (f"# `{name}`\n\n```{{eval-rst}}\n.. automodule:: {name}\n{members}"
            + ("   :undoc-members:\n   :show-inheritance:\n" if own else "") + "```\n")
    if homes:  # a table of the re-exports, each linked to its entry, with its summary
        heading = (f"Also exported by `{name}`" if own else f"What `{name}` exports")
        text += (f"\n## {heading}\n\n```{{eval-rst}}\n.. py:currentmodule:: None\n\n.. autosummary::\n   :nosignatures:\n\n"
                 + "".join(f"   ~{home}\n" for home in homes) + "```\n")
    return text


def _home(module_name: str, export: str, obj: object) -> str | None:
    """The documented full name of ``module_name.export``: where a class or function is
    defined; for data, the module that assigns it (None: not found in the package)."""
    if inspect.isclass(obj) or inspect.isfunction(obj):
        return f"{obj.__module__}.{obj.__qualname__}"
    for candidate in [module_name] + public_modules():
        if export in _assigned(candidate) and getattr(importlib.import_module(candidate),
                                                       export, None) is obj:
            return f"{candidate}.{export}"
    return None


def _assigned(module_name: str) -> set[str]:
    """The names a module assigns at its top level (its own data, not imports)."""
    import ast

    source = inspect.getsource(importlib.import_module(module_name))
    names = set()
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def toc_block(modules: list[str]) -> str:
    lines = [BEGIN, '  - caption: "Reference: the dsv3lite package"\n', "    chapters:\n",
             "      - file: book/reference/index\n", "        sections:\n"]
    lines += [f"          - file: book/reference/{m}\n" for m in modules]
    return "".join(lines) + END


def expected() -> dict[Path, str]:
    """Every file this script writes, with its text (the toc with its block replaced)."""
    modules = public_modules()
    files = {PAGES / "index.md": INDEX}
    files.update({PAGES / f"{m}.md": page_text(m) for m in modules})
    toc = TOC.read_text()
    if BEGIN in toc:
        head, rest = toc.split(BEGIN, 1)
        toc = head + toc_block(modules) + rest.split(END, 1)[1]
    else:
        toc = toc.rstrip("\n") + "\n" + toc_block(modules)
    files[TOC] = toc
    return files


def main() -> None:
    files = expected()
    for stale in PAGES.glob("*.md"):
        if stale not in files:
            stale.unlink()
    PAGES.mkdir(exist_ok=True)
    for path, text in files.items():
        path.write_text(text)
    print(f"wrote {len(files) - 1} pages into {PAGES.relative_to(ROOT)} and the toc's block")


if __name__ == "__main__":
    main()
