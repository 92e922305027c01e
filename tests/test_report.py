"""The HTML book: built from the executed notebooks, every page renders in headless Chromium."""

import csv
import os
import re
import shutil

import nbformat
import pytest

from helpers import paper, paths
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
    about = {f"{p.stem}.html" for p in report.about_pages()}
    assert {"glossary.html", "history.html"} <= about  # the pages about the book (lab.html where it exists)
    assert set(pages) == {"index.html", *(f"{nb.stem}.html" for nb in paths.notebooks()), *about}
    for page, info in pages.items():
        assert info["headings"] == 1 and info["title"], page  # one page title, rendered
        assert not info["broken images"], (page, info["broken images"])
        assert page in about or info["images"] >= 2, page  # the landing page and every notebook show figures
        assert not info["console errors"], (page, info["console errors"])
        assert info["unrendered math"] == 0, page  # every equation typeset (MathJax served with the book)
        raw = (html / page).read_text().count("<p>|")
        assert raw == 0, (page, f"{raw} Markdown table(s) left as text")  # every table rendered as a table


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


def test_about_pages_follow_the_notebooks_in_a_fixed_order(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "NOTEBOOKS_DIR", tmp_path)
    for name in ("index", "history", "aside", "glossary"):
        (tmp_path / f"{name}.md").write_text(f"# {name}\n")
    assert [p.name for p in report.about_pages()] == ["glossary.md", "history.md", "aside.md"]  # no lab here
    (tmp_path / "lab.md").write_text("# lab\n")
    assert [p.stem for p in report.about_pages()] == ["lab", "glossary", "history", "aside"]
    assert report.toctree("About this book", ["lab", "glossary"]).splitlines()[2:4] == [
        ":caption: About this book",
        ":hidden:",
    ]


def test_a_book_page_expands_its_directives(tmp_path):
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "t.md").write_text("| a |\n|---|\n| 1 |\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n{table} t\n\n{table} gone\n")
    with pytest.raises(report.ReportError, match=r"page\.md names gone"):  # the error names the page
        report.expand_page(page, figures, tmp_path)
    page.write_text("# Page\n\n{table} t\n")
    assert "| 1 |" in report.expand_page(page, figures, tmp_path)


@pytest.fixture
def published(monkeypatch):
    """The committed figures/ (the tests' default is an empty temporary folder)."""
    monkeypatch.delenv("PATCHSEARCH_FIGURES")


def test_readme_results_are_the_published_tables(published):
    """The README's results block is exactly what ``readme_results`` builds from the committed tables, so it
    cannot drift from them: after a publish, ``python -m helpers.runners.report --readme`` rewrites it."""
    block = report.readme_block(paths.README.read_text())
    assert block == report.readme_results(report.README_PROFILE), (
        "README.md's results block differs from the published tables: run python -m helpers.runners.report --readme"
    )
    for name in ("07_evaluation_table2_headline", "07_evaluation_table1_headline"):  # the landing page's tables
        assert (paths.published_dir("cifar10") / f"{name}.md").read_text().strip() in block
    for caveat in ("pooled agreement", "The paper's rule, RSD, picks", "seed 0", "No paper-strength results"):
        assert caveat in block
    removals = {  # the false-removal caveat reads the removal study's rows
        (r["variant"], r["data"]): r["clean removed (%)"]
        for r in report._rows(paths.published_dir("cifar10"), "06_false_removals")
        if r["method"] == "patchsearch" and r["ensemble"] == "mean"
    }
    if ("natural-negatives", "poisoned") in removals:  # named in the README, its numbers left to notebook 06
        assert "`natural-negatives`" in block


def test_the_false_removal_caveat_waits_for_the_variant(tmp_path):
    """Without the variant's rows in the removal study's table, the caveat says nothing."""
    (tmp_path / "06_false_removals.csv").write_text(
        "method,variant,ensemble,data,removed,recall (%),clean removed (%)\n"
        "patchsearch,paste-2/3,mean,poisoned,1409,99.9,4.56\n"
    )
    from helpers import params

    record = {"params": params.load(paths.PARAMS_DIR / "cifar10.yaml").to_dict()}
    assert report._classifier_caveat(tmp_path, record) == ""
    with (tmp_path / "06_false_removals.csv").open("a") as f:
        f.write("patchsearch,natural-negatives,mean,poisoned,1067,100.0,0.74\n")
    (tmp_path / "07_generality.csv").write_text("configuration\ndefault\n")
    for linked in ("06_false_removals.md", "07_generality.md"):
        (tmp_path / linked).write_text("| |\n")
    text = report._classifier_caveat(tmp_path, record)
    assert "removes 4.6% of the clean images at recall 99.9%" in text and "`natural-negatives`" in text
    assert "exclude-top-clusters" not in text  # not in the removal study's table yet
    with (tmp_path / "06_false_removals.csv").open("a") as f:
        f.write("patchsearch,exclude-top-clusters,mean,poisoned,1200,100.0,1.96\n")
    v = "PatchSearch, top clusters excluded"
    header = ["configuration", "PatchSearch clean removed (%)", "PatchSearch recall (%)"]
    header += [f"{v} clean removed (%)", f"{v} recall (%)", f"{v} held out"]
    rows = [("truck-99", 4.8, 82.9, 3.0, 95.0, True), ("copies-3", 5.0, 90.0, 6.0, 99.0, True)]
    rows += [("default", 4.6, 99.9, 1.96, 100, False), ("frog-33", 4.0, 80.0, "", "", True)]  # frog: not run
    with (tmp_path / "07_generality.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    text = report._classifier_caveat(tmp_path, record)
    assert "(`natural-negatives` and `exclude-top-clusters`)" in text  # their numbers: notebook 06, generality
    assert "pasted sides in [2w/3, 4w/3), the paper's [w/3, 4w/3))" in text


def test_readme_block_is_rewritten_in_place_and_only_there(tmp_path, published):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{report.README_START}\nstale\n{report.README_END}\n\nafter\n")
    assert report.write_readme_results(readme=readme)
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "stale" not in text
    assert not report.write_readme_results(readme=readme)  # unchanged the second time
    readme.write_text("# No block\n")
    with pytest.raises(report.ReportError, match="no results block"):
        report.write_readme_results(readme=readme)


def test_a_publish_elsewhere_leaves_the_readme_alone():
    """``reproduce --publish`` rewrites the README only from the repository's own figures/ (which it links)."""
    from helpers.runners import reproduce

    before = paths.README.read_text()
    assert not reproduce.publish_readme("cifar10")  # PATCHSEARCH_FIGURES points at a temporary folder here
    assert not reproduce.publish_readme("smoke")
    assert paths.README.read_text() == before


def readme_words(text: str) -> int:
    """Words as a reader counts them: tokens with a letter or a digit (a table's pipes and rules are not)."""
    return len(re.findall(r"\S*\w\S*", text))


def test_readme_is_short_and_shows_the_two_commands():
    text = paths.README.read_text()
    assert readme_words(text) <= 1500, f"README.md has {readme_words(text)} words: move detail to the book"
    assert "make reproduce   #" in text and "make test        #" in text
    assert "On a fresh machine" in text
    hashes = re.findall(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", text)
    assert not hashes, f"commit hashes belong on the history page: {hashes}"
    assert not re.search(r"\b[Ii]ssues? \d", text), "issue numbers belong on the history page"


def test_readme_cites_the_papers_of_paper_yaml():
    text = paths.README.read_text()
    for name, source in paper.load()["sources"].items():
        assert source["url"] in text, f"README.md does not link {name}'s paper ({source['url']})"


def test_paste_ranges_read_as_fractions_of_the_window():
    assert [report._fraction(x) for x in (2 / 3, 4 / 3, 0.3333, 1.0, 0.45)] == ["2w/3", "4w/3", "w/3", "w", "0.45w"]


def test_the_backdoor_caveat_names_only_planted_trainings_that_were_retrained(tmp_path):
    """A removed backdoor is claimed only where one was planted and the filtered list was trained again."""
    (tmp_path / "07_evaluation_table2_byol.md").write_text("| |\n")
    byol = "model,labels,ASR (%)\nClean,10%,5.2 ± 1.2\nBackdoored,10%,46.7 ± 37.8\nPatchSearch,10%,4.4 ± 0.6\n"
    (tmp_path / "07_evaluation_table2_byol.csv").write_text(byol)
    general = "configuration,backdoor present,probe ASR (%),clean model ASR (%),PatchSearch defended ASR (%)\n"
    (tmp_path / "07_generality.csv").write_text(general + "a,True,40.0,5.0,nan\nb,False,9.0,5.0,6.0\n")
    text = report._defended_planted(tmp_path)
    assert "ASR 46.7 ± 37.8% before, 4.4 ± 0.6% after PatchSearch, the clean model's 5.2 ± 1.2%" in text
    assert "`a`" not in text and "`b`" not in text  # a: not retrained; b: nothing planted to remove
    (tmp_path / "07_generality.csv").write_text(general + "a,True,40.0,5.0,6.5\n")
    assert "`a`: ASR 40.0% before, 6.5% after PatchSearch, the clean model's 5.0%" in report._defended_planted(tmp_path)
    (tmp_path / "07_evaluation_table2_byol.csv").write_text(byol.replace("46.7 ± 37.8", "9.0 ± 1.0"))
    (tmp_path / "07_generality.csv").write_text(general)
    assert "No training that plants a backdoor has been retrained" in report._defended_planted(tmp_path)


def test_the_count_caveat_says_where_the_judged_count_lost(tmp_path):
    rows = ["configuration,seen,window,count,AUC", "default,True,12,into_vs_flat,0.9", "default,True,12,changed,0.5"]
    rows += ["s1,False,12,into_vs_flat,0.6", "s1,False,14,into_vs_flat,0.7", "s1,False,12,changed,0.3"]
    rows += ["s1,False,14,changed,0.3", "b,False,12,into_vs_flat,0.7", "b,False,12,changed,0.8"]
    (tmp_path / "05_search_score_rules_long.csv").write_text("\n".join(rows) + "\n")
    text = report._count_judged(tmp_path, "into_vs_flat")
    assert "0.65 against the paper's count's 0.30 on `s1` and 0.70 against the paper's count's 0.80 on `b`" in text
    assert "did not beat the paper's count on every configuration" in text and "`default`" not in text


def test_the_cluster_vote_caveat_reports_here_and_on_the_configurations_held_out(tmp_path):
    assert report._cluster_vote_caveat(tmp_path) == ""  # notebook 06 has not published it
    rows = "method,ensemble,vote,recall (%),clean removed (%)\nPatchSearch,mean,none,99.9,4.56\n"
    rows += "PatchSearch,mean,cluster vote,97.7,0.02\nPatchSearch,unanimous,cluster vote,95.0,0.0\n"
    (tmp_path / "06_poison_classifier_cluster_vote.csv").write_text(rows)
    for linked in ("06_poison_classifier_cluster_vote.md", "07_generality.md"):
        (tmp_path / linked).write_text("| |\n")
    general = 'configuration,backdoor present,cluster vote held out,"PatchSearch recall, cluster vote (%)",'
    general += '"PatchSearch clean removed, cluster vote (%)"\n'
    (tmp_path / "07_generality.csv").write_text(general + "default,False,False,97.7,0.02\n")
    text = report._cluster_vote_caveat(tmp_path)
    assert "Here: PatchSearch 0.02% of the clean images at recall 97.7%." in text
    assert "it has not run on a configuration made after that yet" in text
    (tmp_path / "07_generality.csv").write_text(general + "default,False,False,97.7,0.02\nc,True,True,93.0,0.10\n")
    assert "on the 1 configuration run after it, PatchSearch: `c` (planted) 0.10% at recall 93.0%" in (
        report._cluster_vote_caveat(tmp_path)
    )
