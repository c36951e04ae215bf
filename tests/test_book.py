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


@pytest.fixture(scope="module")
def built_book(tmp_path_factory):
    """One strict build for every test below: (return code, log tail, html folder)."""
    out = tmp_path_factory.mktemp("book")
    jb = Path(sys.executable).with_name("jupyter-book")
    result = subprocess.run(
        [str(jb), "build", str(ROOT), "--builder", "html", "-W", "--keep-going",
         "--path-output", str(out)],
        capture_output=True, text=True, timeout=1800)
    log = result.stdout[-6000:] + result.stderr[-6000:]
    return result.returncode, log, out / "_build" / "html"


@pytest.mark.book
def test_strict_book_build_executes_every_notebook(built_book):
    returncode, log, html = built_book
    assert returncode == 0, log
    assert (html / "index.html").exists()
    for name in _toc_files():
        page = html / f"{name}.html"
        assert page.exists(), f"missing page {page}"
        text = page.read_text()
        assert "Traceback" not in text, f"{name} shows a traceback"
    mathjax = html / "_static" / "mathjax" / "tex-chtml.js"
    assert mathjax.exists(), "MathJax must be served from the build (sphinx-mathjax-offline)"


@pytest.mark.book
def test_build_report_lists_each_chapter_with_its_run_time(built_book):
    """The Build report page has one row per chapter, with a run time and "ran"."""
    returncode, log, html = built_book
    assert returncode == 0, log
    page = (html / "book" / "build_report.html").read_text()
    rows = re.findall(r"<tr.*?</tr>", page, flags=re.S)
    for name in [n for n in _toc_files() if n.startswith("notebooks/")]:
        row = next((r for r in rows if name in r), None)
        assert row is not None, f"{name} is missing from the build report"
        cells = [c.strip() for c in re.findall(r"<p>(.*?)</p>", row, flags=re.S)]
        assert "ran" in cells, f"{name}: {cells}"
        assert any(re.fullmatch(r"\d+(\.\d+)?", c) for c in cells), f"{name}: {cells}"
    assert "\u2705" not in page  # no emoji: offline fonts may not have it


@pytest.mark.book
def test_the_api_reference_documents_the_public_api_and_chapters_link_to_it(built_book):
    """Reference: one page per public module with each public name's entry (signature
    included); a chapter's first mention of a name links to that entry."""
    returncode, log, html = built_book
    assert returncode == 0, log
    model = (html / "book" / "reference" / "dsv3lite.model.html").read_text()
    for anchor in ("dsv3lite.model.Transformer", "dsv3lite.model.Transformer.forward",
                   "dsv3lite.model.ModelOutput", "dsv3lite.model.convert_to_fp8"):
        assert f'id="{anchor}"' in model, anchor
    assert "Tensor" in model  # the signatures show their type hints
    tour = (html / "notebooks" / "00_model_tour.html").read_text()
    assert "../book/reference/dsv3lite.config.html#dsv3lite.config.ModelArgs" in tour
    reference_pages = [n for n in _toc_files() if n.startswith("book/reference/")]
    assert len(reference_pages) > 40  # the browser test below opens each of them


_CHECK_PAGE = r"""async () => {
    const images = Array.from(document.images);
    images.forEach(img => { img.loading = "eager"; });
    await Promise.all(images.map(img => img.complete ? null : new Promise(done => {
        img.addEventListener("load", done); img.addEventListener("error", done);
    })));
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
        await MathJax.startup.promise;
    }
    const maths = Array.from(document.querySelectorAll(".math"));
    return {
        maths: maths.length,
        unrendered: maths.filter(m => !m.querySelector("mjx-container"))
                         .map(m => m.textContent.slice(0, 80)),
        raw_begin: document.body.innerText.includes("\\begin{"),
        broken_images: images.filter(img => !(img.complete && img.naturalWidth > 0))
                             .map(img => img.getAttribute("src")),
        images: images.length,
    };
}"""


def _chromium() -> str:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Chromium to check the built pages: install it with "
                "`apt-get install chromium` (Debian/Ubuntu; .ci/run does this)")


@pytest.mark.book
def test_built_pages_render_offline_in_a_browser(built_book):
    """Every page in headless Chromium with the network off: each equation rendered by
    the bundled MathJax, every image loaded, no JavaScript error, no request that needed
    the network."""
    returncode, _, html = built_book
    if returncode != 0:
        pytest.skip("the book did not build (test_strict_book_build_... reports why)")
    executable = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    problems, totals = [], {"maths": 0, "images": 0}
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        context = browser.new_context(offline=True)
        for name in _toc_files():
            page = context.new_page()
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            page.goto((html / f"{name}.html").as_uri(), wait_until="load")
            report = page.evaluate(_CHECK_PAGE)
            page.close()
            totals["maths"] += report["maths"]
            totals["images"] += report["images"]
            for key in ("unrendered", "broken_images"):
                if report[key]:
                    problems.append(f"{name}: {key} {report[key][:3]}")
            if report["raw_begin"]:
                problems.append(f"{name}: raw \\begin{{ in the visible text")
            problems += [f"{name}: {e}" for e in errors]
        browser.close()
    assert not problems, "\n".join(problems)
    assert totals["maths"] > 100 and totals["images"] > 20, totals  # the checks saw content
