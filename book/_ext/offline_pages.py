"""Small fixes so that every built page runs in a browser without errors, offline.

- jupyter-book adds the inline scripts of sphinx-togglebutton and sphinx-thebe twice, and
  the second ``const THEBE_JS_URL = ...`` throws "Identifier has already been declared"
  on every page: identical scripts are kept once.
- The theme's colour mode template variable is empty, which its JavaScript reports as
  an error before resetting it to "auto": pages start at "auto".
- myst-nb's execution table (the Build report page) marks each notebook's status with an
  emoji, which a system without an emoji font shows as an empty box, and lists the
  notebook files' modification times, which say nothing about the build: it says "ran"
  or "failed" instead, and drops that column.

MathJax itself comes from the ``sphinx-mathjax-offline`` extension (served from
``_static/mathjax``); tests/test_book.py checks the pages in headless Chromium.
"""

from __future__ import annotations


def _fix_page(app, pagename, templatename, context, doctree) -> None:
    if not context.get("default_mode"):
        context["default_mode"] = "auto"
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for script in scripts:  # inline scripts come with filename None or '': the same
        key = (getattr(script, "filename", None) or "",
               repr(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(script)
    scripts[:] = kept


def _plain_execution_table() -> None:
    try:
        from myst_nb.ext import execution_tables as table
    except ImportError:  # another myst-nb layout: keep its defaults
        return
    table._key2transform["succeeded"] = lambda ok: "ran" if ok is True else "failed"
    table._key2header.pop("mtime", None)


def setup(app):
    app.connect("html-page-context", _fix_page, priority=900)
    _plain_execution_table()
    return {"parallel_read_safe": True, "parallel_write_safe": True}
