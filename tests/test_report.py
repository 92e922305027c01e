"""The HTML book: built from the executed notebooks, every page renders in headless Chromium."""

import os
import shutil

import nbformat
import pytest

from helpers import paths
from helpers.runners import report


def test_blank_notebooks_are_refused(tmp_path, monkeypatch):
    (tmp_path / "01_x.py").write_text("# %%\n1\n")
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")]), tmp_path / "01_x.ipynb")
    monkeypatch.setattr(paths, "NOTEBOOKS_DIR", tmp_path)
    with pytest.raises(report.ReportError, match=r"without outputs: 01_x.ipynb; run `make reproduce`"):
        report.build(out=tmp_path / "site")


def test_landing_page_names_only_published_tables(tmp_path):
    (tmp_path / "t.md").write_text("| a |\n|---|\n| 1 |\n")
    assert report.headline_block("{table} t", tmp_path, tmp_path).startswith("| a |")
    assert report.headline_block("{text} t", tmp_path, tmp_path) == "| a |\n|---|\n| 1 |\n"  # no caption
    with pytest.raises(report.ReportError, match="missing_table.md does not exist"):
        report.headline_block("{table} missing_table", tmp_path, tmp_path)


def have_browser() -> bool:
    return bool(shutil.which("chromium") and shutil.which("chromedriver"))


@pytest.mark.skipif(
    not have_browser() and not os.environ.get("PATCHSEARCH_REQUIRE_BROWSER"),
    reason="no headless Chromium here (.ci/run installs Debian's chromium and chromium-driver)",
)
def test_book_builds_and_every_page_renders(tmp_path, monkeypatch):
    monkeypatch.delenv("PATCHSEARCH_FIGURES")  # the landing page reads the published figures/cifar10/
    html = report.build("cifar10", tmp_path / "report")
    pages = report.check_site(html)
    assert set(pages) == {"index.html", *(f"{nb.stem}.html" for nb in paths.notebooks())}
    for page, info in pages.items():
        assert info["headings"] == 1 and info["title"], page  # one page title, rendered
        assert info["images"] >= 2 and not info["broken images"], (page, info["broken images"])
        assert not info["console errors"], (page, info["console errors"])
        assert info["unrendered math"] == 0, page  # every equation typeset (MathJax served with the book)


def test_mathjax_is_served_with_the_book_where_a_local_copy_exists(tmp_path):
    assert report.vendor_mathjax(tmp_path / "static", root=tmp_path / "none") is None  # then the CDN default
    root = tmp_path / "mathjax"
    for part in report.MATHJAX_PARTS:
        path = root / part
        if path.suffix == ".js":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("// js")
        else:
            (path / "a.js").parent.mkdir(parents=True, exist_ok=True)
            (path / "a.js").write_text("// js")
    (root / "fonts" / "HTML-CSS").mkdir(parents=True)  # the large parts a TeX-to-SVG book does not need
    assert report.vendor_mathjax(tmp_path / "static", root=root) == "mathjax/MathJax.js?config=TeX-AMS_SVG-full"
    assert (tmp_path / "static" / "mathjax" / "jax" / "output" / "SVG" / "fonts" / "TeX" / "a.js").is_file()
    assert not (tmp_path / "static" / "mathjax" / "fonts").exists()
