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
lines, ``headline_block``), and every executed ``notebooks/NN_*.ipynb``. A notebook without outputs is
refused: run ``make reproduce`` first. The site is written to ``<out>/html`` (``index.html``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .. import io, paths

LANDING = paths.NOTEBOOKS_DIR / "index.md"
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


def headline_block(line: str, figures: Path, source: Path) -> str:
    """Expand one landing-page directive line: ``{table} NAME`` pastes the table ``figures/<profile>/NAME.md``
    with its source, ``{text} NAME`` pastes Markdown a notebook computed from its numbers, and
    ``{figure} NAME | caption`` copies ``NAME.png`` into the book and shows it with its caption."""
    kind, _, rest = line.partition(" ")
    name, _, caption = (part.strip() for part in rest.partition("|"))
    if kind in ("{table}", "{text}"):
        path = figures / f"{name}.md"
        if not path.is_file():
            raise ReportError(f"{LANDING.name} names {name}, but {path} does not exist: run make reproduce")
        if kind == "{text}":
            return path.read_text().rstrip() + "\n"
        return path.read_text().rstrip() + f"\n\n*Table: `figures/{figures.name}/{name}.md`.*\n"
    if kind == "{figure}":
        path = figures / f"{name}.png"
        if not path.is_file():
            raise ReportError(f"{LANDING.name} names the figure {name}, but {path} does not exist: run make reproduce")
        (source / "_figures").mkdir(exist_ok=True)
        shutil.copyfile(path, source / "_figures" / path.name)
        return f"```{{figure}} _figures/{path.name}\n:width: 100%\n\n{caption}\n```\n"
    raise ReportError(f"{LANDING.name}: unknown directive {line!r} (use {{table}}, {{text}} or {{figure}})")


def favicon(path: Path) -> None:
    """The site's icon: an HTBA-like 4 x 4 colour grid (a browser asks for one on every page)."""
    import numpy as np
    from PIL import Image

    grid = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((32, 32), Image.NEAREST).save(path)


def landing_page(profile: str, source: Path) -> str:
    figures = paths.published_dir(profile)
    lines = []
    for line in LANDING.read_text().splitlines():
        lines.append(headline_block(line, figures, source) if re.match(r"^\{(table|text|figure)\} ", line) else line)
    notebooks = "\n".join(nb.stem for nb in paths.notebooks())
    toctree = f"```{{toctree}}\n:maxdepth: 1\n:caption: The notebooks\n:hidden:\n\n{notebooks}\n```\n"
    return "\n".join(lines) + "\n\n" + toctree


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
    pages = ["index.html", *(f"{nb.stem}.html" for nb in paths.notebooks())]
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


def site_size(html: Path) -> int:
    return sum(p.stat().st_size for p in html.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cifar10", help="whose published figures the landing page shows")
    parser.add_argument("--out", default=str(paths.REPO_ROOT / "build" / "report"))
    parser.add_argument("--check", action="store_true", help="then open every page in headless Chromium")
    parser.add_argument("--screenshots", metavar="DIR", help="with --check: screenshots of the landing page and 05")
    args = parser.parse_args(argv)
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
