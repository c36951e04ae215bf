"""The book builds strictly: every notebook executes top to bottom and Sphinx emits no warning.

This is the notebook test too: one strict build executes each notebook once.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _toc_files() -> list[str]:
    text = (ROOT / "_toc.yml").read_text()
    return re.findall(r"^\s*-?\s*(?:root|file):\s*(\S+)", text, flags=re.M)


def test_every_notebook_is_in_the_table_of_contents():
    listed = set(_toc_files())
    notebooks = {f"notebooks/{p.stem}" for p in (ROOT / "notebooks").glob("*.md")}
    assert notebooks, "no notebooks found"
    assert notebooks <= listed, f"not in _toc.yml: {sorted(notebooks - listed)}"


def test_notebooks_are_myst_text_without_outputs():
    for path in (ROOT / "notebooks").glob("*.md"):
        head = path.read_text().split("---")[1]
        assert "format_name: myst" in head, f"{path.name} is not a MyST notebook"


@pytest.mark.book
def test_strict_book_build_executes_every_notebook(tmp_path):
    jb = Path(sys.executable).with_name("jupyter-book")
    result = subprocess.run(
        [str(jb), "build", str(ROOT), "--builder", "html", "-W", "--keep-going",
         "--path-output", str(tmp_path)],
        capture_output=True, text=True, timeout=1800)
    log = result.stdout[-6000:] + result.stderr[-6000:]
    assert result.returncode == 0, log
    html = tmp_path / "_build" / "html"
    assert (html / "index.html").exists()
    for name in _toc_files():
        page = html / f"{name}.html"
        assert page.exists(), f"missing page {page}"
        text = page.read_text()
        assert "Traceback" not in text, f"{name} shows a traceback"
