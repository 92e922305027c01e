"""The HTML book: the executed notebooks and a landing page, built with Sphinx and myst-nb.

    python -m helpers.runners.report [--profile cifar10] [--out build/report]      # make report

Why Sphinx + myst-nb (with the book theme): it is what Jupyter Book 1 is built on, without the extra layer;
it is pure Python, so the project's pip pins hold it (Jupyter Book 2 runs on the Node.js MyST engine,
which nothing else here needs); and it renders the notebooks' stored outputs without executing them
(``nb_execution_mode = "off"``), so the book shows exactly what ``make reproduce`` computed and builds in
seconds.

The book's source is assembled in ``<out>/source`` from what the repository holds: the landing page
``notebooks/index.md`` (what this is, the threat model, reading order, learning goals) with the headline
tables and figures of ``figures/<profile>/`` pasted in where it names them (``{table}`` and ``{figure}``
lines, ``headline_block``), every executed ``notebooks/NN_*.ipynb``, and the pages about the book, every
other ``notebooks/*.md`` (``about_pages``: the lab, the glossary, how the settings were found). A notebook
without outputs is refused: run ``make reproduce`` first. The site is written to ``<out>/html``
(``index.html``).

The README's "results at a glance" are built from the same published tables (``readme_results``) and
rewritten between its markers by ``python -m helpers.runners.reproduce --publish`` (or ``--readme`` here), so
that the README can never state a number the published tables do not hold.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .. import io, paths

LANDING = paths.NOTEBOOKS_DIR / "index.md"
# The pages about the book, after the notebooks, in this order; any other ``notebooks/*.md`` follows them.
ABOUT_ORDER = ("lab", "glossary", "history")
README_PROFILE = "cifar10"  # whose published tables the README's results block shows
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"
CONF = """# Written by helpers.runners.report: the book's Sphinx configuration.
project = "PatchSearch and PoisonCAM, step by step"
author = "the project's authors"
extensions = ["myst_nb"]
html_theme = "sphinx_book_theme"
html_title = "PatchSearch & PoisonCAM"
html_theme_options = {"show_toc_level": 2, "use_download_button": True}
html_context = {"default_mode": "light"}  # without it the theme's first page load logs an error
html_favicon = "_figures/favicon.png"
nb_execution_mode = "off"  # the notebooks were executed by `make reproduce`: show their stored outputs
myst_enable_extensions = ["dollarmath", "colon_fence"]
exclude_patterns = ["_build"]
suppress_warnings = ["mystnb.unknown_mime_type"]
html_last_updated_fmt = None
master_doc = "index"
html_static_path = ["_static"]
html_css_files = ["wide.css"]  # the notebooks' wide code and tables get the page's width
nb_render_markdown_format = "gfm"  # Markdown a cell displays may hold tables (myst-nb's default, commonmark, has none)
nb_merge_streams = True  # a cell's log lines in one block, not one block per line
html_copy_source = False
html_show_sourcelink = False
"""


WIDE_CSS = """.bd-page-width { max-width: 100%; }
.bd-main .bd-content .bd-article-container { max-width: 100%; }
"""


class ReportError(RuntimeError):
    pass


# MathJax for the notebooks' equations, served with the book where Debian's libjs-mathjax is installed
# (``.ci/run`` installs it): a book opened without a network still renders its math, and the browser check
# sees no failed download. Without it the book loads MathJax from Sphinx's default CDN.
LOCAL_MATHJAX = Path("/usr/share/javascript/mathjax")
MATHJAX_PARTS = ("MathJax.js", "config/TeX-AMS_SVG-full.js", "extensions", "jax/input/TeX", "jax/element",
                 "jax/output/SVG/jax.js", "jax/output/SVG/config.js", "jax/output/SVG/autoload",
                 "jax/output/SVG/fonts/TeX")  # fmt: skip


# myst-nb marks notebook pages ``tex2jax_ignore`` and has MathJax process only the ``math`` elements it wrote
# (MathJax 3's ``processHtmlClass``): MathJax 2 says the same with ``tex2jax.processClass``.
MATHJAX2_CONF = """mathjax_path = {path!r}
mathjax2_config = {{"tex2jax": {{"processClass": "tex2jax_process|mathjax_process|math|output_area"}}}}
"""


def vendor_mathjax(static: Path, root: Path = LOCAL_MATHJAX) -> str | None:
    """Copy the parts of a local MathJax 2 that render TeX as SVG into the book's ``_static/mathjax``;
    return the ``mathjax_path`` Sphinx loads it by, or None where there is no local MathJax."""
    if not (root / "MathJax.js").is_file():
        return None
    for part in MATHJAX_PARTS:
        src, dst = root / part, static / "mathjax" / part
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copyfile(src, dst)
    return "mathjax/MathJax.js?config=TeX-AMS_SVG-full"


def executed(notebook: Path) -> bool:
    """Whether a notebook holds outputs (the published, executed pair)."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    return any(c.get("outputs") for c in nb.cells if c.cell_type == "code")


def headline_block(line: str, figures: Path, source: Path, page: str = LANDING.name) -> str:
    """Expand one directive line of a book page (``page``): ``{table} NAME`` pastes the table
    ``figures/<profile>/NAME.md`` with its source, ``{text} NAME`` pastes Markdown a notebook computed from its
    numbers, and ``{figure} NAME | caption`` copies ``NAME.png`` into the book and shows it with its caption."""
    kind, _, rest = line.partition(" ")
    name, _, caption = (part.strip() for part in rest.partition("|"))
    if kind == "{caveats}":
        return plain_paths(caveats(figures.name))
    if kind in ("{table}", "{text}"):
        path = figures / f"{name}.md"
        if not path.is_file():
            raise ReportError(f"{page} names {name}, but {path} does not exist: run make reproduce")
        if kind == "{text}":
            return path.read_text().rstrip() + "\n"
        return plain_paths(_table(figures, name))
    if kind == "{figure}":
        path = figures / f"{name}.png"
        if not path.is_file():
            raise ReportError(f"{page} names the figure {name}, but {path} does not exist: run make reproduce")
        (source / "_figures").mkdir(exist_ok=True)
        shutil.copyfile(path, source / "_figures" / path.name)
        return f"```{{figure}} _figures/{path.name}\n:width: 100%\n\n{caption}\n```\n"
    raise ReportError(f"{page}: unknown directive {line!r} (use {{table}}, {{text}}, {{figure}} or {{caveats}})")


DIRECTIVE = re.compile(r"^\{(table|text|figure)\} |^\{caveats\}$")


def expand_page(page: Path, figures: Path, source: Path) -> str:
    """A book page's Markdown with every directive line expanded (``headline_block``)."""
    lines = page.read_text().splitlines()
    expanded = (headline_block(line, figures, source, page.name) if DIRECTIVE.match(line) else line for line in lines)
    return "\n".join(expanded)


def about_pages() -> list[Path]:
    """The book's pages besides the landing page and the notebooks: every other ``notebooks/*.md``, those named
    in ``ABOUT_ORDER`` first and in that order (whichever exist), then any other by name."""
    pages = [p for p in sorted(paths.NOTEBOOKS_DIR.glob("*.md")) if p.name != LANDING.name]
    rank = {name: i for i, name in enumerate(ABOUT_ORDER)}
    return sorted(pages, key=lambda p: (rank.get(p.stem, len(ABOUT_ORDER)), p.name))


def favicon(path: Path) -> None:
    """The site's icon: an HTBA-like 4 x 4 colour grid (a browser asks for one on every page)."""
    import numpy as np
    from PIL import Image

    grid = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((32, 32), Image.NEAREST).save(path)


def toctree(caption: str, names: list[str]) -> str:
    entries = "\n".join(names)
    return f"```{{toctree}}\n:maxdepth: 1\n:caption: {caption}\n:hidden:\n\n{entries}\n```\n"


def landing_page(profile: str, source: Path) -> str:
    """The landing page, its directives expanded, with the side bar's two tables of contents: the notebooks,
    then the pages about the book."""
    page = expand_page(LANDING, paths.published_dir(profile), source)
    page += "\n\n" + toctree("The notebooks", [nb.stem for nb in paths.notebooks()])
    about = [p.stem for p in about_pages()]
    return page + ("\n" + toctree("About this book", about) if about else "")


def build(profile: str = "cifar10", out: Path | None = None, strict: bool = True) -> Path:
    """Assemble the book's source and build the site; return ``<out>/html``."""
    out = Path(out) if out else paths.REPO_ROOT / "build" / "report"
    notebooks = [nb.with_suffix(".ipynb") for nb in paths.notebooks()]
    blank = [nb.name for nb in notebooks if not nb.is_file() or not executed(nb)]
    if blank:
        raise ReportError(f"notebooks without outputs: {', '.join(blank)}; run `make reproduce` first")
    source = out / "source"
    if source.exists():
        shutil.rmtree(source)
    source.mkdir(parents=True)
    mathjax = vendor_mathjax(source / "_static")
    io.write_text(source / "conf.py", CONF + (MATHJAX2_CONF.format(path=mathjax) if mathjax else ""))
    io.write_text(source / "index.md", landing_page(profile, source))
    for nb in notebooks:
        shutil.copyfile(nb, source / nb.name)
    for page in about_pages():
        io.write_text(source / page.name, expand_page(page, paths.published_dir(profile), source) + "\n")
    favicon(source / "_figures" / "favicon.png")
    io.write_text(source / "_static" / "wide.css", WIDE_CSS)
    html = out / "html"
    tmp = out / "html.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    command = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-d", str(out / "doctrees"), str(source), str(tmp)]
    if strict:
        command[3:3] = ["-W", "--keep-going"]  # every warning (a broken image, a bad reference) fails the build
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise ReportError(f"sphinx-build failed:\n{done.stdout}\n{done.stderr}")
    if html.exists():
        shutil.rmtree(html)
    tmp.rename(html)  # the previous site stays until the new one is complete
    return html


def browser(width: int = 1280, height: int = 900):
    """Headless Chromium through Selenium, with the browser's console log kept (Debian's ``chromium`` and
    ``chromium-driver`` packages; ``.ci/run`` installs them where missing)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        raise ReportError("headless Chromium not found: install Debian's chromium and chromium-driver packages")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))


def check_site(html: Path, screenshots: dict[str, Path] | None = None) -> dict[str, dict]:
    """Open every page of the built site in headless Chromium over a local HTTP server; per page: its title,
    how many images it has and how many failed to load, the console's errors, and how many pieces of TeX
    were left as text. ``screenshots`` maps a
    page (``index.html``) to a PNG path to save a full-page screenshot to."""
    import functools
    import http.server
    import threading

    from selenium.webdriver.support.ui import WebDriverWait

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # no request lines on the terminal
            pass

    handler = functools.partial(Handler, directory=str(html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pages = ["index.html", *(f"{p.stem}.html" for p in [*paths.notebooks(), *about_pages()])]
    report, driver = {}, browser()
    try:
        for page in pages:
            driver.get(f"http://127.0.0.1:{server.server_port}/{page}")
            # every image loads now (none waits to be scrolled to), then wait until each has finished or failed
            driver.execute_script("for (const i of document.images) { i.loading = 'eager'; }")
            WebDriverWait(driver, 30).until(
                lambda d, page=page: d.execute_script(
                    "return document.readyState === 'complete' && document.URL.endsWith(arguments[0]) && "
                    "Array.from(document.images).every(i => i.complete)",
                    page,
                )
            )
            images = driver.execute_script(
                "return Array.from(document.images).map(i => [i.currentSrc, i.naturalWidth > 0])"
            )
            if driver.execute_script("return typeof MathJax !== 'undefined' && !!MathJax.Hub"):  # let it typeset
                driver.set_script_timeout(60)
                driver.execute_async_script("const done = arguments[arguments.length - 1]; MathJax.Hub.Queue(done);")
            # TeX left as text: math MathJax did not typeset, or a formula the Markdown parser split
            raw_tex = driver.execute_script(
                "const t = (document.querySelector('article') || document.body).innerText;"
                "return (t.match(/\\\\[(\\[]/g) || []).length + (t.match(/\\$\\$/g) || []).length"
            )
            errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            report[page] = {
                "title": driver.title,
                "headings": len(driver.find_elements("css selector", "article h1")),
                "images": len(images),
                "broken images": [src for src, ok in images if not ok],
                "console errors": errors,
                "unrendered math": raw_tex,
            }
            if screenshots and page in screenshots:
                height = driver.execute_script("return document.body.scrollHeight")
                driver.set_window_size(1280, min(int(height), 6000))
                driver.save_screenshot(str(screenshots[page]))
                driver.set_window_size(1280, 900)
    finally:
        driver.quit()
        server.shutdown()
    return report


# ------------------------------------------------------------------------------------- the README's results
RULE_NAMES = {
    "rsd": ("rsd",),
    "contrast": ("contrast",),
    "agreement": ("agreement",),
    "pooled": ("pooled agreement", "pooled"),
}  # a rule's column names in the blind-window tables
RULE_WORDS = {"rsd": "RSD, the paper's rule", "contrast": "contrast", "agreement": "agreement",
              "pooled": "pooled agreement"}  # fmt: skip


def plain_paths(markdown: str) -> str:
    """The README's links to repository files as plain code paths, for the book (which holds no such file)."""
    return re.sub(r"\[(`[^`]+`)\]\([^)]+\)", r"\1", markdown)


def _published(figures: Path, name: str) -> Path:
    path = figures / name
    if not path.is_file():
        raise ReportError(f"the README's results read {path}, which does not exist: run make reproduce")
    return path


def _rows(figures: Path, name: str) -> list[dict[str, str]]:
    with _published(figures, f"{name}.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _link(figures: Path, name: str) -> str:
    """A link from the README to a published file (``name`` with its suffix)."""
    _published(figures, name)
    return f"[`figures/{figures.name}/{name}`](figures/{figures.name}/{name})"


def _table(figures: Path, name: str) -> str:
    """A published Markdown table with a link to its file, as the landing page pastes it."""
    table = _published(figures, f"{name}.md").read_text().rstrip()
    return f"{table}\n\n*Table: {_link(figures, name + '.md')}.*\n"


def _column(row: dict[str, str], rule: str, what: str) -> str:
    for name in RULE_NAMES[rule]:
        if f"{name} {what}" in row:
            return f"{name} {what}"
    raise ReportError(f"no column for the {rule} rule's {what!r} among {sorted(row)}")


def _count(rows: list[dict[str, str]], column: str) -> int:
    return sum(row[column] == "True" for row in rows)


def _within(rows: list[dict[str, str]]) -> str:
    """The blind-window tables' closeness criterion, as their column names state it (``within 5 points``)."""
    return re.search(r"within [^,]+", next(c for c in rows[0] if " within " in c)).group(0)


def _spread(rows: list[dict[str, str]], column: str) -> str:
    """The range of a published column over ``rows``, in %."""
    values = sorted(float(r[column]) for r in rows)
    return f"{values[0]:.1f}-{values[-1]:.1f}%" if len(values) > 1 else f"{values[0]:.1f}%"


def _fraction(share: float) -> str:
    """``share`` times w as a fraction with a denominator up to 6 (``2w/3``, ``4w/3``, ``w``), else to two
    decimals (``0.45w``)."""
    from fractions import Fraction

    near = Fraction(share).limit_denominator(6)
    if abs(float(near) - share) > 1e-3:
        return f"{share:.2f}w"
    top = "w" if near.numerator == 1 else f"{near.numerator}w"
    return top if near.denominator == 1 else f"{top}/{near.denominator}"


def _and(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


def _percent(share: float) -> str:
    return f"{100 * share:.3g}%"


def _window_caveat(figures: Path, rule: str) -> str:
    sweep = _rows(figures, "05_search_window_sweep")
    picks = []
    for method in dict.fromkeys(row["method"] for row in sweep):
        rows = [row for row in sweep if row["method"] == method]
        used = next(row for row in rows if row["used"] == "True")
        rsd = next(row for row in rows if row["RSD pick"] == "True")
        picks.append((method, used, rsd))
    top = "top-20 acc (ground truth)"
    chosen = ", ".join(f"{m} {u['window']} px (top-20 accuracy {_percent(float(u[top]))})" for m, u, _ in picks)
    text = (
        "- **Which window.** Each defense's window side w (the square it cuts around a heatmap's peak) was chosen "
        f"from the data, without the ground truth, by the profile's rule, {RULE_WORDS[rule]}: {chosen}."
    )
    if rule == "pooled":  # is each pick clear of the other sides over the rule's draws?
        for method, used, _ in picks:
            rows = [r for r in sweep if r["method"] == method and r["window"] != used["window"]]
            floor = float(used["pooled"]) - float(used["pooled sd"])
            near = [r for r in rows if float(r["pooled"]) >= floor]
            if near:
                text += (
                    f" {method}'s pick is within the draws' noise: at "
                    f"{_and([r['window'] + ' px' for r in near])} the pooled statistic is within one sd of the pick's "
                    f"({float(used['pooled']):.3f} ± {float(used['pooled sd']):.3f} over its draws), and top-20 "
                    f"accuracy there is {_and([_percent(float(r[top])) for r in near])}."
                )
    if rule != "rsd":
        paper = " and ".join(f"{r['window']} px for {m} ({_percent(float(r[top]))})" for m, _, r in picks)
        text += f" The paper's rule, RSD, picks {paper} ({_link(figures, '05_search_window_sweep.md')})."
        general = [r for r in _rows(figures, "07_generality_blind_window") if r["method"] == "PatchSearch"]
        seeds = _rows(figures, "07_generality_seeds_blind_window")
        held = [r for r in general if r[_column(r, rule, "held out")] == "True"]
        ours, theirs = _column(general[0], rule, _within(general)), _column(general[0], "rsd", _within(general))
        text += (
            f" The {RULE_WORDS[rule]} rule was chosen after seeing this profile's results. Over {len(general)} "
            f"attack configurations (this one and {len(general) - 1} more), PatchSearch's pick is "
            f"{_within(general)} of the best side's top-20 accuracy on {_count(general, ours)} of them with this rule "
            + (
                f"({_count(held, ours)} of the {len(held)} run after it was fixed)"
                if held
                else "(every one was in view when it was chosen)"
            )
            + f" and on {_count(general, theirs)} "
            f"with RSD ({_link(figures, '07_generality_blind_window.md')})" + f". On {len(seeds)} backdoored models "
            f"trained with other SSL seeds after the rule was fixed, it is {_within(seeds)} on "
            f"{_count(seeds, _column(seeds[0], rule, _within(seeds)))} of {len(seeds)} "
            f"({_link(figures, '07_generality_seeds_blind_window.md')})."
        )
    return text + "\n"


def _count_caveat(figures: Path, record: dict) -> str:
    """Which configurations PoisonCAM's flip-test count was chosen on, from the score study's record."""
    count = record["params"]["search"]["poisoncam_score"]
    study = _published(figures, "05_search_score_rules_RECORD.md").read_text()
    seen = re.search(r"configurations seen while choosing a count: (.+)", study).group(1).strip()
    judged = [f"`{name}`" for name in re.findall(r"--run ([\w-]+)", study) if name not in seen.split(", ")]
    judged_words = " and ".join([", ".join(judged[:-1]), judged[-1]] if len(judged) > 1 else judged)
    return (
        f"- **PoisonCAM's count was chosen here.** The profile scores PoisonCAM's flip test with `{count}`, a count "
        "with a control for occlusion (the rows \"paper's count\" use its paper's count). It was chosen "
        f"on the score study of this configuration ({', '.join(f'`{n}`' for n in seen.split(', '))}) and judged "
        f"on {judged_words} "
        f"({_link(figures, '05_search_score_rules.md')}): its rows above are not a blind result."
        + _count_judged(figures, count)
        + _poisoncam_after_rules(figures)
        + "\n"
    )


def _count_judged(figures: Path, count: str) -> str:
    """What the score study's unseen configurations said: the count's mean AUC over the sides against the paper's
    ``changed``, from ``05_search_score_rules_long``."""
    sums: dict[tuple[str, str], list[float]] = {}
    for r in _rows(figures, "05_search_score_rules_long"):
        if r["seen"] == "False":
            sums.setdefault((r["configuration"], r["count"]), []).append(float(r["AUC"]))
    names = list(dict.fromkeys(name for name, _ in sums))
    if not names:
        return ""

    def mean(name: str, c: str) -> float:
        return sum(sums[name, c]) / len(sums[name, c])

    return (
        " Mean AUC over the sides where it was judged: "
        + _and([f"{mean(n, count):.2f} against the paper's count's {mean(n, 'changed'):.2f} on `{n}`" for n in names])
        + (
            "."
            if all(mean(n, count) > mean(n, "changed") for n in names)
            else ": it did not beat the paper's count on every configuration it was judged on."
        )
    )


def _poisoncam_after_rules(figures: Path) -> str:
    """PoisonCAM (the profile's count and window rule) on the generality configurations made after both were
    fixed, from the published generality table; empty where it has not run on them."""
    from ..studies import generality

    # every configuration made after the count and the window rule were fixed
    after = generality.CONFIGS_AFTER_RULES | generality.CONFIGS_AFTER_TOWARD | generality.CONFIGS_AFTER_JUDGING
    rows = [r for r in _rows(figures, "07_generality") if r["configuration"] in after]
    rows = [r for r in rows if r.get("PoisonCAM w") not in (None, "", "nan")]
    if not rows:
        return ""

    def one(r: dict) -> str:
        removed = f"planted, {float(r['PoisonCAM clean removed (%)']):.1f}% of clean images removed"
        return f"{float(r['PoisonCAM top-20 (%)']):.0f}% on `{r['configuration']}`" + (
            f" ({removed})" if r["backdoor present"] == "True" else ""
        )

    return (
        f" Top-20 on the {len(rows)} configurations made after it and the window rule: "
        f"{', '.join(one(r) for r in rows)} ({_link(figures, '07_generality.md')})."
    )


def _classifier_caveat(figures: Path, record: dict) -> str:
    """The profile's false removals, its pasted sides beside the paper's, and the names of the classifier variants
    the removal study published (their numbers: notebook 06 and the generality table; the README is short)."""
    from .. import params as params_mod
    from ..studies import generality, removal

    profile = params_mod.from_dict(record["params"], "the published record")
    own = next((n for n in removal.VARIANTS if removal.variant_params(profile, n) == profile), None)
    paper_scale = removal.VARIANTS["paper"]["paste_scale"]
    removals = [r for r in _rows(figures, "06_false_removals") if r["ensemble"] == "mean" and r["data"] == "poisoned"]
    shown, first = [], None  # first: (method's label, the profile's row) of the first method shown
    for label, (method, variant) in generality.CLASSIFIER_VARIANTS.items():
        rows = {r["variant"]: r for r in removals if r["method"] == method}
        if own in rows and variant in rows:
            shown.append(f"`{variant}`")
            first = first or (label.split(",")[0], rows[own])
    if not shown:
        return ""
    base, row = first
    return (
        f"- **False removals.** With the profile's poison classifier (`{own}`: pasted sides in "
        f"[{_fraction(profile.classifier.paste_scale[0])}, {_fraction(profile.classifier.paste_scale[1])}), the "
        f"paper's [{_fraction(paper_scale[0])}, {_fraction(paper_scale[1])})), {base} removes "
        f"{float(row['clean removed (%)']):.1f}% of the clean images at recall {float(row['recall (%)']):.1f}% "
        f"({_link(figures, '06_false_removals.md')}). Variants that are not the profile's ({' and '.join(shown)}), "
        f"and the configurations each was judged on: notebook 06 and {_link(figures, '07_generality.md')}.\n"
    )


def _cluster_vote_caveat(figures: Path) -> str:
    """The cluster vote (``classify.cluster_vote``, not the paper's) on this configuration, where it was chosen,
    and on the generality configurations held out from its choice; empty before notebook 06 publishes it."""
    if not (figures / "06_poison_classifier_cluster_vote.csv").is_file():
        return ""
    from ..studies import generality

    rows = [r for r in _rows(figures, "06_poison_classifier_cluster_vote") if r["ensemble"] == "mean"]
    here = "; ".join(  # "of the clean images" once
        f"{r['method']} {float(r['clean removed (%)']):.2f}%{' of the clean images' if i == 0 else ''} at recall "
        f"{float(r['recall (%)']):.1f}%"
        for i, r in enumerate(r for r in rows if r["vote"] == "cluster vote")
    )
    seen = [f"`{n}`" for n in generality.CHOSEN_ON["cluster-vote"]]
    column = "PatchSearch recall, cluster vote (%)"
    held = [
        r
        for r in _rows(figures, "07_generality")
        if r.get("cluster vote held out") == "True" and r.get(column) not in (None, "", "nan")
    ]
    judged = (
        f"; on the {len(held)} configuration{'s' if len(held) != 1 else ''} run after it, PatchSearch: "
        + "; ".join(
            f"`{r['configuration']}` ({'planted' if r['backdoor present'] == 'True' else 'not planted'}) "
            f"{float(r['PatchSearch clean removed, cluster vote (%)']):.2f}% at recall {float(r[column]):.1f}%"
            for r in held
        )
        + f" ({_link(figures, '07_generality.md')})."
        if held
        else "; it has not run on a configuration made after that yet."
    )
    return (
        "- **A vote of the clusters** (not the paper's: a removal stands only where the ensemble removes more than "
        f"half of its k-means cluster; {_link(figures, '06_poison_classifier_cluster_vote.md')}). Here: "
        f"{here}. Chosen after computing it on {_and(seen)}" + judged + "\n"
    )


def _backdoor_caveat(figures: Path, record: dict) -> str:
    from .. import evaluate

    method, seed = record["params"]["ssl"]["method"], str(record["params"]["ssl"]["seed"])
    per_seed = _rows(figures, "07_evaluation_table2_ssl_seeds_per_seed")
    names = {row["SSL method"].lower().replace("-", ""): row["SSL method"] for row in per_seed}
    shown = next(r for r in per_seed if r["SSL method"] == names.get(method, method) and r["SSL seed"] == seed)
    planted = shown["plants a backdoor"] == "True"
    seeds = " and ".join(
        f"{r['seeds that plant a backdoor']} of {r['SSL seeds']} {r['SSL method']} trainings"
        for r in _rows(figures, "07_evaluation_table2_ssl_seeds")
    )
    configurations = _rows(figures, "07_generality")
    planted_rows = [r for r in configurations if r["backdoor present"] == "True"]
    planting = len(planted_rows)
    defended = "; ".join(
        f"`{r['configuration']}` ({r['probe ASR (%)']}% against {r['clean model ASR (%)']}%): PatchSearch "
        f"top-20 {r['PatchSearch top-20 (%)']}%, recall {r['PatchSearch recall (%)']}%, "
        f"{r['PatchSearch clean removed (%)']}% of the clean images removed"
        for r in planted_rows
        if r.get("PatchSearch w")
    )
    return (
        "- **A weak backdoor, on one training.** At CPU scale (CIFAR-10's 32 px images, a narrow ResNet-18) the "
        f"backdoored model's ASR is {float(shown['ASR ratio']):.1f}x the clean model's, "
        f"{'which meets' if planted else 'below'} the project's rule for a planted backdoor "
        f"({evaluate.planted_rule()}). Over SSL training seeds (seed {seed} and others), {seeds} plant one "
        f"({_link(figures, '07_evaluation_table2_ssl_seeds.md')}). Over {len(configurations)} attack "
        f"configurations, {planting} {'plants' if planting == 1 else 'plant'} one "
        f"({_link(figures, '07_generality.md')})"
        + (f"; where one is planted: {defended}. " if defended else ". ")
        + f"Every table above comes from one SSL training (seed {seed}), "
        + (
            "so the claim that a defense removes the backdoor rests on that training."
            if planted
            else "which plants no backdoor by that rule: its tables show what the defenses find and what they cost, "
            "not that they remove a planted backdoor."
        )
        + _defended_planted(figures)
        + "\n"
    )


def _defended_planted(figures: Path) -> str:
    """The trainings that plant a backdoor and were retrained on a defense's filtered list (Table 2's BYOL rows,
    the generality table's defended ASR): the ASR before and after, beside the clean model's."""
    from .. import evaluate

    found = []
    byol = {r["model"]: r for r in _rows(figures, "07_evaluation_table2_byol") if r["labels"] == "10%"}
    if {"Clean", "Backdoored", "PatchSearch"} <= set(byol):
        mean = {k: float(v["ASR (%)"].split(" ± ")[0]) for k, v in byol.items()}
        if evaluate.backdoor_planted(mean["Backdoored"] / 100, mean["Clean"] / 100):
            found.append(
                f"BYOL (the profile's `byol` variant, 10% labels): ASR {byol['Backdoored']['ASR (%)']}% before, "
                f"{byol['PatchSearch']['ASR (%)']}% after PatchSearch, the clean model's {byol['Clean']['ASR (%)']}% "
                f"({_link(figures, '07_evaluation_table2_byol.md')})"
            )
    for r in _rows(figures, "07_generality"):
        defended = r.get("PatchSearch defended ASR (%)", "nan")
        if r["backdoor present"] == "True" and defended not in ("", "nan"):
            found.append(
                f"`{r['configuration']}`: ASR {r['probe ASR (%)']}% before, {defended}% after PatchSearch, the clean "
                f"model's {r['clean model ASR (%)']}%"
            )
    if not found:
        return " No training that plants a backdoor has been retrained on a defense's filtered list yet."
    return f" Retrained on a defense's filtered list where a backdoor is planted: {'; '.join(found)}."


def _gpu_caveat() -> str:
    from .. import params as params_mod
    from . import gpu

    profile = params_mod.load(gpu.PARAMS).profile
    jobs = gpu.read_manifest(profile).get("jobs", {})
    done = [job.name for job in gpu.JOBS if jobs.get(job.name, {}).get("complete")]
    text = (
        "- **No paper-strength results yet.** `params/cifar10-gpu.yaml` is the paper's attack at CIFAR-10 scale, "
        f"fixed before any GPU run and computed as a queue of {len(gpu.JOBS)} jobs, one at a time on a lent GPU. "
    )
    record = paths.published_dir(profile) / "RECORD.md"
    if record.is_file():
        return text + f"Its published run: {_link(record.parent, 'RECORD.md')}.\n"
    if not done:
        return text + "None has run yet, so its results do not exist.\n"
    verb = "has" if len(done) == 1 else "have"
    text += (
        f"{len(done)} of them {verb} run ({_link(record.parent, gpu.REPORT_NAME)}); its notebooks wait for the rest. "
    )
    epochs = gpu.read_manifest(profile)["jobs"][gpu.JOBS[0].name]["epochs"]
    fraction = max(params_mod.load(gpu.PARAMS).eval.label_fractions)
    verdict = gpu.backdoor_verdict(profile, fraction)
    if verdict:
        text += (
            f"Trained for {epochs['chosen']} epochs (the aim: {epochs['aim']}), its backdoored model's ASR at "
            f"{_percent(fraction)} labels is {100 * verdict['asr']:.1f}% against the clean model's "
            f"{100 * verdict['clean_asr']:.1f}%: {'planted' if verdict['planted'] else 'not planted'} by the "
            "project's rule, on one SSL seed."
        )
    return text + "\n"


def readme_results(profile: str = README_PROFILE) -> str:
    """The README's "results at a glance", from the published tables of ``figures/<profile>/``: the two
    headline tables the landing page pastes, each with a link to its file, and the caveats each headline needs
    (which rule chose the window, how weak the backdoor is, what has not run), every number read from a
    published table. ``write_readme_results`` puts it between the README's markers."""
    figures = paths.published_dir(profile)
    record = json.loads(_published(figures, "record.json").read_text())
    counts = {row["quantity"]: row["value"] for row in _rows(figures, "01_attack_counts")}
    labels = max(record["params"]["eval"]["label_fractions"])
    parts = [
        README_START,
        "<!-- Written by helpers.runners.report.readme_results when make reproduce publishes: do not edit. -->",
        "",
        f"From the published run of the default profile, `{profile}` ({_link(figures, 'RECORD.md')}).",
        "",
        f"**Does the rise in ASR survive a defense?** A linear probe on {_percent(labels)} of the labels, mean ± sd "
        "over probe seeds. ASR: the share of patched test images the probe sends to the target category, beside "
        f"the clean model's. In words: {_link(figures, '07_evaluation_headline.md')}.",
        "",
        _table(figures, "07_evaluation_table2_headline"),
        "**Do the defenses find the poisons?** Detection with the window chosen from the data by the profile's "
        "rule (chosen with this configuration in view: see the caveats), under the paper's "
        "ensemble rule (mean) and a unanimous one. Chance for top-20 accuracy and precision: the poison rate, "
        f"{_percent(float(counts['poisoned_fraction_of_train']))}. In words: "
        f"{_link(figures, '07_evaluation_detection.md')}.",
        "",
        _table(figures, "07_evaluation_table1_headline"),
        "**Caveats.**",
        "",
        _caveats(figures, record),
        README_END,
    ]
    return "\n".join(parts)


def caveats(profile: str = README_PROFILE) -> str:
    """What each headline rests on, as Markdown bullets computed from ``figures/<profile>/``: which rule chose
    the window and what the paper's picks, which configurations PoisonCAM's count was chosen on, how weak the
    backdoor is and on how many trainings, and what the GPU profile has run. The README and the landing page
    (``{caveats}``) both show it."""
    figures = paths.published_dir(profile)
    return _caveats(figures, json.loads(_published(figures, "record.json").read_text()))


def _caveats(figures: Path, record: dict) -> str:
    return (
        _window_caveat(figures, record["params"]["search"]["window_rule"])
        + _count_caveat(figures, record)
        + _classifier_caveat(figures, record)
        + _cluster_vote_caveat(figures)
        + _backdoor_caveat(figures, record)
        + _gpu_caveat()
    )


def readme_block(readme: str) -> str:
    """The README's results block, markers included."""
    start, end = readme.find(README_START), readme.find(README_END)
    if start < 0 or end < start:
        raise ReportError(f"the README has no results block ({README_START} ... {README_END})")
    return readme[start : end + len(README_END)]


def write_readme_results(profile: str = README_PROFILE, readme: Path | None = None) -> bool:
    """Rewrite the README's results block from the published tables (atomically); return whether it changed."""
    readme = Path(readme) if readme else paths.README
    text = readme.read_text()
    new = text.replace(readme_block(text), readme_results(profile))
    if new != text:
        io.write_text(readme, new)
    return new != text


def site_size(html: Path) -> int:
    return sum(p.stat().st_size for p in html.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cifar10", help="whose published figures the landing page shows")
    parser.add_argument("--out", default=str(paths.REPO_ROOT / "build" / "report"))
    parser.add_argument("--check", action="store_true", help="then open every page in headless Chromium")
    parser.add_argument("--screenshots", metavar="DIR", help="with --check: screenshots of the landing page and 05")
    parser.add_argument(
        "--readme", action="store_true", help="only rewrite the README's results block from the published tables"
    )
    args = parser.parse_args(argv)
    if args.readme:
        try:
            changed = write_readme_results(README_PROFILE)
        except ReportError as e:
            raise SystemExit(f"error: {e}") from e
        print(f"{paths.README}: results block {'rewritten' if changed else 'unchanged'}")
        return
    start = time.perf_counter()
    try:
        html = build(args.profile, Path(args.out))
    except ReportError as e:
        raise SystemExit(f"error: {e}") from e
    print(
        f"built {html / 'index.html'} in {time.perf_counter() - start:.0f} s "
        f"({site_size(html) / 2**20:.1f} MiB); open it in a browser"
    )
    if args.check:
        shots = None
        if args.screenshots:
            Path(args.screenshots).mkdir(parents=True, exist_ok=True)
            pages = ("index.html", "05_search.html")
            shots = {page: Path(args.screenshots) / f"{Path(page).stem}.png" for page in pages}
        for page, info in check_site(html, shots).items():
            print(page, info)


if __name__ == "__main__":
    main()
