"""No typed result: every number a notebook's prose states is computed, or it is not a result.

How the Markdown scan tells a result from what is not one. A number in a Markdown cell (or the book's
landing page) passes when it is:
- inside a code span or math (`classifier.top_k`, `{"kd": {"trusted": 0.5}}`, $w/3$): a name the reader
  looks up in the params file, an input the reader types, or a definition of the method;
- a reference: a section, table, figure, equation, notebook, step or item number (Sec. 5.5, Table 10,
  notebooks 03-07), a venue's year (CVPR 2022), an ordered list's marker;
- part of a name (ResNet-18, CIFAR-10, MoCo-v2, bf16, 7x7, top-20).
Every other number fails: a measured value, a parameter's value typed where it can drift from the params
file, or a paper's number typed instead of read from ``params/paper.yaml``. Those are rendered by code cells
(``notebook.show_markdown``) from computed values, the profile's params and ``helpers.paper``.

The book's other pages are scanned the same way (the glossary, the lab page where it exists), except the
history page, ``notebooks/history.md`` ("How the settings were found"): it quotes past numbers as history.
It is held to a different rule instead: every section that quotes a number names the commit it dates from,
every commit it names exists, and every published file it names exists.
"""

import ast
import re
import subprocess

import jupytext
import pytest

from helpers import paper, paths

STRIP = (
    (re.compile(r"```.*?```", re.S), " "),  # fenced code
    (re.compile(r"`[^`\n]*`"), " "),  # code spans
    (re.compile(r"\$\$.*?\$\$", re.S), " "),  # display math
    (re.compile(r"\$[^$\n]+\$"), " "),  # inline math
    (re.compile(r"\]\([^)]*\)"), "]"),  # link targets
    (re.compile(r"https?://\S+"), " "),
    (re.compile(r"<[^>]+>"), " "),  # HTML tags
)
REFERENCE = re.compile(
    r"\b(?:Sec(?:tion)?s?\.?|Tables?|Fig(?:ure)?s?\.?|Eqs?\.?|[Nn]otebooks?|Steps?|[Ii]tems?|Appendix|Algorithm)"
    r"\s*\d+(?:\.\d+)*(?:\s*(?:-|–|and|,|to)\s*\d+(?:\.\d+)*)*"
    r"|\b(?:CVPR|ICCV|ECCV|ICLR|NeurIPS|ICML|AAAI|arXiv)\s*\d{4}|\bet al\.,?\s*\d{4}"
    r"|^\s*\d+\.\s|\b0\d\b(?:\s*[-–]\s*0\d\b)?"  # a list marker; notebook numbers such as 01 or 03-07
)
NAME = re.compile(r"\b[A-Za-z]\w*-\d+\b|\b\w*[A-Za-z]\d\w*\b|\b\d+[A-Za-z]\w*\b")  # ResNet-18, bf16, 7x7, 2D
NUMBER = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?(?!\w)")


HISTORY = paths.NOTEBOOKS_DIR / "history.md"
COMMIT = re.compile(r"`([0-9a-f]{7,40})`")


def typed_numbers(markdown: str) -> list[tuple[str, str]]:
    """The numbers of ``markdown`` that are neither in code or math, nor a reference, nor part of a name:
    ``(number, its line)``."""
    for pattern, replacement in STRIP:
        markdown = pattern.sub(replacement, markdown)
    found = []
    for line in markdown.split("\n"):
        rest = NAME.sub(" ", REFERENCE.sub(" ", line))
        found += [(m.group(0), line.strip()) for m in NUMBER.finditer(rest)]
    return found


def prose() -> dict[str, list[str]]:
    pages = {p.name: [c.source for c in jupytext.read(p).cells if c.cell_type == "markdown"]
             for p in sorted(paths.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py"))}  # fmt: skip
    pages["index.md"] = [(paths.NOTEBOOKS_DIR / "index.md").read_text()]
    for page in sorted(paths.NOTEBOOKS_DIR.glob("*.md")):  # the pages about the book, but the history
        if page.name not in ("index.md", HISTORY.name):
            pages[page.name] = [page.read_text()]
    return pages


@pytest.mark.parametrize("page", sorted(prose()))
def test_no_typed_number_in_the_prose(page):
    found = [f"{number!r} in: {line}" for cell in prose()[page] for number, line in typed_numbers(cell)]
    assert not found, f"{page} types numbers its code should render:\n" + "\n".join(found)


def history_sections() -> list[tuple[str, str]]:
    """The history page's sections, ``(heading, text)``, the part above the first ``##`` heading included."""
    parts = re.split(r"^(## .*)$", HISTORY.read_text(), flags=re.M)
    return [("(opening)", parts[0])] + [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts), 2)]


def test_the_history_page_dates_every_number_it_quotes():
    """History may quote numbers that have since changed, but only dated: a section that types a number
    names the commit(s) it dates from (the current values are in the published tables it names)."""
    undated = [
        f"{heading}: {typed_numbers(text)[0][1]}"
        for heading, text in history_sections()
        if typed_numbers(text) and not COMMIT.search(text)
    ]
    assert not undated, "sections of history.md quote numbers without a commit:\n" + "\n".join(undated)


def test_the_history_page_names_real_commits_and_files():
    text = HISTORY.read_text()
    shallow = subprocess.run(
        ["git", "rev-parse", "--is-shallow-repository"], cwd=paths.REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    if shallow == "false":  # a shallow clone lacks the history the page dates from
        for commit in sorted(set(COMMIT.findall(text))):
            found = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=paths.REPO_ROOT)
            assert found.returncode == 0, f"history.md names commit {commit}, which is not in this history"
    for path in sorted(set(re.findall(r"`(figures/[^`\s]+)`", text))):
        assert list(paths.REPO_ROOT.glob(path)), f"history.md names {path}, which does not exist"


def test_the_scan_tells_results_from_references_and_names():
    assert typed_numbers("the ASR drops to 6.8% with 547 images removed") == [
        ("6.8", "the ASR drops to 6.8% with 547 images removed"),
        ("547", "the ASR drops to 6.8% with 547 images removed"),
    ]
    assert [n for n, _ in typed_numbers("trains for 25 epochs")] == ["25"]  # a parameter's value drifts
    passes = (
        "Table 10 and Sec. 5.5 of Saha et al., CVPR 2022, notebooks 03-07, Figure 3",
        "ResNet-18 on CIFAR-10 with MoCo-v2 in bf16, a 7x7 grid, top-20 accuracy",
        '`classifier.top_k` patches, `{"kd": {"trusted": 0.5}}`, $[w/3, 4w/3)$',
        "1. **First.** an exercise",
    )
    assert all(typed_numbers(text) == [] for text in passes)


def test_no_notebook_types_a_table_of_published_numbers():
    """A paper's table lives in ``params/paper.yaml``: no notebook code cell holds a dict of numeric rows."""
    for path in sorted(paths.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict) and len(node.values) >= 2:
                rows = [v for v in node.values if isinstance(v, ast.Tuple)]
                numeric = [r for r in rows if r.elts and all(isinstance(e, ast.Constant) and
                           isinstance(e.value, float) for e in r.elts)]  # fmt: skip
                assert len(numeric) < 2, f"{path.name}:{node.lineno} types a table of numbers: use helpers.paper"


def test_the_published_numbers_load_and_errors_name_the_key(tmp_path):
    assert paper.table("table10")["Clean, no defense"][0] > paper.table("table10")["Clean, PatchSearch"][0]
    assert len(paper.columns("table3")) == len(paper.table("table3")["Backdoored"])
    assert 0 < paper.setting("poison_share") < paper.setting("poison_rate") <= 1
    assert paper.cite("patchsearch").startswith("[") and "arxiv.org" in paper.cite("patchsearch")
    with pytest.raises(KeyError, match=r"paper\.yaml: no tables\.table11 \(it has: .*table10"):
        paper.table("table11")
    bad = tmp_path / "paper.yaml"
    bad.write_text(
        "sources: {}\nsettings: {}\nfigure3_potency_reduction: {}\n"
        "tables: {t: {source: x, columns: [a, b], rows: {r: [1]}}}\n"
    )
    with pytest.raises(KeyError, match=r"tables\.t\.rows\.r has 1 values for 2 columns"):
        paper.load(bad)
    (tmp_path / "short.yaml").write_text("sources: {}\n")
    with pytest.raises(KeyError, match=r"short\.yaml: no section settings"):
        paper.load(tmp_path / "short.yaml")


def test_the_settings_tables_come_from_both_files():
    from helpers import notebook, params

    p = params.from_dict(
        {"profile": "x", "attack": {"trigger_px": 8, "poison_rate": 1.0, "n_copies": 2, "train_margin": 0.05},
         "ssl": {"epochs": 7, "optimizer": "adamw", "lr": 0.001, "width": 32, "stem_stride": 2}}
    )  # fmt: skip
    attack_rows = dict(
        line.split(" | ")[0:3:2] for line in notebook.attack_settings(p, (1000, 3, 32, 32), 100).split("\n")[2:]
    )
    assert attack_rows["| trigger side"] == "8 px (6.2% of the area), 2 per image |"
    assert attack_rows["| poisoned"] == "100% of the target category (10% of the data) |"
    assert "[0.05 W, 0.95 W - w]" in attack_rows["| training trigger's top-left corner"]
    paper_side = f"{paper.setting('trigger_px')} px"
    assert paper_side in notebook.attack_settings(p, (1000, 3, 32, 32), 100)
    training = notebook.training_settings(p, (1000, 3, 32, 32))
    assert "| 7 epochs, adamw (lr 0.001) |" in training and "ResNet-18 at 0.5 width, stride-2 stem" in training
    assert f"{paper.setting('epochs')} epochs" in training


def test_the_glossary_states_the_planted_rule_as_the_code_has_it():
    from helpers import evaluate

    text = (paths.NOTEBOOKS_DIR / "glossary.md").read_text()
    assert f"`evaluate.PLANTED_ASR` (`{evaluate.PLANTED_ASR:g}`)" in text
    assert f"`evaluate.PLANTED_FACTOR` (`{evaluate.PLANTED_FACTOR:g}`)" in text
