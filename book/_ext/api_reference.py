"""Keeps the book's API reference honest: a public name without a docstring fails the build.

Sphinx's autodoc renders the pages under book/reference (written by reference_pages.py).
With ``:undoc-members:`` an undocumented class, function, method or property still gets an
entry; this extension reports each such entry as a warning, which the strict build
(``-W``) turns into an error. A module's own constant in ``__all__`` needs a ``#:``
comment (autodoc leaves out data without one); that is checked here too.

Docstrings may name a public object the way an importer writes it: ``dsv3lite.Transformer``
(a package's re-export) or, inside a module, a bare name the module imports. Such a
reference is resolved to where the object is documented. In a package's summary table,
which shows each name's first docstring line outside its module, a short name links where
it names exactly one documented object. A reference that resolves nowhere stays a warning. Broken cross-references fail through ``nitpicky`` in
_config.yml; names from other projects (torch, numpy, ...) are not links, since the book
is built without fetching their inventories, and ``nitpick_ignore_regex`` says so there.
"""

from __future__ import annotations

import re

from sphinx.util import logging

logger = logging.getLogger(__name__)

# Entries that must say what they are; data and attributes (dataclass fields, constants)
# are documented by their class's or module's docstring instead.
NEEDS_DOCSTRING = {"module", "class", "exception", "function", "method", "property",
                   "classmethod", "staticmethod"}


def _check_docstring(app, what, name, obj, options, lines) -> None:
    if what in NEEDS_DOCSTRING and not any(line.strip() for line in lines):
        logger.warning("public %s %s has no docstring (the API reference needs one)",
                       what, name, type="api_reference", subtype="missing_docstring")


def _check_module_data(app, what, name, obj, options, lines) -> None:
    if what != "module" or not hasattr(obj, "__all__"):
        return
    from reference_pages import _assigned
    from sphinx.pycode import ModuleAnalyzer

    documented = {attr for _, attr in ModuleAnalyzer.for_module(name).find_attr_docs()}
    for export in sorted(set(obj.__all__) & _assigned(name) - documented):
        logger.warning("public constant %s.%s has no '#:' comment (the API reference needs "
                       "one)", name, export, type="api_reference", subtype="missing_docstring")


def _find(path: str) -> object | None:
    """The object a dotted path names (a module, then attributes), or None."""
    import importlib

    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _documented_name(path: str) -> str | None:
    """Where autodoc documents the object ``path`` names (classes and functions by their
    definition, their members through them, constants by the module that assigns them)."""
    import inspect
    from typing import TypeVar

    from reference_pages import _home

    parent, _, last = path.rpartition(".")
    obj = _find(path)
    if obj is None or isinstance(obj, TypeVar):
        return None
    if inspect.isclass(obj) or inspect.isfunction(obj):
        return f"{obj.__module__}.{obj.__qualname__}"
    owner = _find(parent)
    if inspect.isclass(owner):
        return f"{owner.__module__}.{owner.__qualname__}.{last}"
    if inspect.ismodule(owner):
        return _home(owner.__name__, last, obj)
    return None


def _resolve_reexport(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    candidates = [target]
    if node.get("py:module"):
        candidates.append(f"{node['py:module']}.{target}")
    for candidate in candidates:
        if not candidate.startswith("dsv3lite"):
            continue
        if isinstance(_find(candidate), __import__("typing").TypeVar):
            return contnode  # a type variable: plain text, nothing to link
        name = _documented_name(candidate)
        if name and name != target:
            domain = env.get_domain("py")
            found = domain.resolve_any_xref(env, node["refdoc"], app.builder, name, node,
                                            contnode)
            if found:
                return found[0][1]
    if not node.get("py:module") and not target.startswith("dsv3lite"):
        # a docstring's first line in a package's summary table, read outside its module:
        # a short name such as ``Transformer.forward`` links where it names one object only
        found = env.get_domain("py").resolve_any_xref(env, node["refdoc"], app.builder,
                                                      target, node, contnode)
        same_kind = [ref for role, ref in found
                     if node["reftype"] in ("obj", role.split(":", 1)[1])]
        if len(same_kind) == 1:
            return same_kind[0]
    return None


# A summary cut right after a citation's abbreviation: "... ([LF] Eq." from "([LF] Eq. 4)."
_CUT_AT_ABBREVIATION = re.compile(r"\b(Eqs?|Figs?|Algs?|Tabs?|Sec|cf|e\.g|i\.e)\.$")


def _summary_past_abbreviations(extract):
    """Sphinx's autosummary takes a docstring's first sentence as its summary and ends a
    sentence at any period and space, so "routed experts (Eq. 12 without the residual)"
    became "routed experts (Eq.". Where that happens, the whole first paragraph is used."""
    def summary(doc, document):
        text = extract(doc, document)
        if _CUT_AT_ABBREVIATION.search(text):
            paragraph = []
            for line in doc:
                if not line.strip():
                    if paragraph:
                        break
                    continue
                paragraph.append(line.strip())
            text = " ".join(paragraph)
        return text
    summary.wrapped = extract
    return summary


def setup(app):
    from sphinx.ext import autosummary

    if not hasattr(autosummary.extract_summary, "wrapped"):
        autosummary.extract_summary = _summary_past_abbreviations(autosummary.extract_summary)
    app.connect("autodoc-process-docstring", _check_docstring)
    app.connect("autodoc-process-docstring", _check_module_data)
    app.connect("missing-reference", _resolve_reexport)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
