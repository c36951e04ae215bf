"""The book's API reference part (book/reference, written by book/_ext/reference_pages.py)
is up to date, covers every public module, and its checks can fail: a public name without a
docstring, or a reference that resolves nowhere, fails a strict build.

The strict build of the whole book, reference included, is tests/test_book.py."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))
import reference_pages  # noqa: E402


def test_the_pages_and_the_toc_are_what_the_generator_writes():
    stale = [str(path.relative_to(ROOT)) for path, text in reference_pages.expected().items()
             if not path.exists() or path.read_text() != text]
    assert not stale, f"out of date (run python book/_ext/reference_pages.py): {stale}"
    pages = {p.stem for p in (ROOT / "book" / "reference").glob("*.md")} - {"index"}
    assert pages == set(reference_pages.public_modules())
    assert {"dsv3lite", "dsv3lite.model", "dsv3lite.fp8.linear", "dsv3lite.grpo.objective"} <= pages
    assert not any(name.endswith("__main__") for name in pages)


def test_the_modules_go_from_the_ground_up():
    order = reference_pages.public_modules()
    assert order.index("dsv3lite.fp8.reference") < order.index("dsv3lite.config")
    assert order.index("dsv3lite.config") < order.index("dsv3lite.model")
    assert order.index("dsv3lite.model") < order.index("dsv3lite.train")


def test_a_package_page_links_its_reexports_to_their_home():
    text = reference_pages.page_text("dsv3lite")
    assert "   ~dsv3lite.model.Transformer\n" in text and "autosummary" in text
    assert ":members: __version__" in text  # its own name, documented there


def _build(tmp_path: Path, module_source: str, page: str) -> subprocess.CompletedProcess:
    """A strict Sphinx build of one page with this book's extension and reference settings."""
    pytest.importorskip("sphinx")  # the book's dependency (not in make floor-test's venv)
    (tmp_path / "pkg_under_test.py").write_text(textwrap.dedent(module_source))
    (tmp_path / "conf.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(tmp_path)!r}, {str(ROOT / 'book' / '_ext')!r}]
        extensions = ["sphinx.ext.autodoc", "api_reference"]
        nitpicky = True
        autodoc_inherit_docstrings = False
        """))
    (tmp_path / "index.rst").write_text(page)
    return subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-W", "-q", "-E",
                           str(tmp_path), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)


PAGE = """Test
====

.. automodule:: pkg_under_test
   :members:
   :undoc-members:
"""


def test_a_documented_module_builds_strictly(tmp_path):
    done = _build(tmp_path, '''
        """A module."""
        __all__ = ["f", "LIMIT"]
        #: the largest value
        LIMIT = 3
        def f(x: int) -> int:
            """Twice :data:`LIMIT` plus ``x``."""
            return 2 * LIMIT + x
        ''', PAGE)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("source,message", [
    ('"""A module."""\n__all__ = ["f"]\ndef f(x: int) -> int:\n    return x\n',
     "public function pkg_under_test.f has no docstring"),
    ('"""A module."""\n__all__ = ["LIMIT"]\nLIMIT = 3\n',
     "public constant pkg_under_test.LIMIT has no '#:' comment"),
    ('"""A module."""\n__all__ = ["f"]\ndef f(x: int) -> int:\n    """See :func:`g`."""\n',
     "reference target not found: g"),
])
def test_a_missing_docstring_or_a_broken_reference_fails_the_build(tmp_path, source, message):
    done = _build(tmp_path, source, PAGE)
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_a_summary_is_not_cut_at_a_citation():
    """Autosummary ends a sentence at any period: "(Eq." becomes the whole first paragraph."""
    pytest.importorskip("sphinx")
    import api_reference

    cut = api_reference._summary_past_abbreviations(lambda doc, document: "Experts (Eq.")
    doc = ["Experts (Eq. 12 without", "the residual).", "", "More text."]
    assert cut(doc, None) == "Experts (Eq. 12 without the residual)."
    fine = api_reference._summary_past_abbreviations(lambda doc, document: "Fine.")
    assert fine(["Fine. More."], None) == "Fine."
