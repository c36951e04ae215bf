"""Small fixes so that every built page runs in a browser without errors, offline.

- jupyter-book adds the inline scripts of sphinx-togglebutton and sphinx-thebe twice, and
  the second ``const THEBE_JS_URL = ...`` throws "Identifier has already been declared"
  on every page: identical scripts are kept once.
- The theme's colour mode template variable is empty, which its JavaScript reports as
  an error before resetting it to "auto": pages start at "auto".

MathJax itself comes from the ``sphinx-mathjax-offline`` extension (served from
``_static/mathjax``); tests/test_book_browser.py checks the pages in headless Chromium.
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


def setup(app):
    app.connect("html-page-context", _fix_page, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
