"""What every notebook does first: load the profile, resolve the data root, set up logging."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from pathlib import Path

from . import paths
from .cache import RECOMPUTE_ENV
from .params import Params, load, with_overrides, with_resolved_root
from .runners.checkpoints import install


class _NoCacheHits(logging.Filter):
    """Drops the cache's "cache hit" lines from a notebook's output (misses, which compute, stay)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "helpers.cache" and record.getMessage().startswith("cache hit"))


def setup(params_path: str | Path, overrides: dict | None = None, cache_hits: bool = False) -> Params:
    """Load ``params_path`` (relative paths are taken from the repository root), resolve the data root,
    log the cache's misses (what a cell computes) to the notebook's output, and its hits too with
    ``cache_hits``, and install the profile's shipped checkpoints (``helpers.runners.checkpoints``) that
    match the params, so that a notebook opened on a fresh clone trains nothing.

    ``overrides`` changes keys for an experiment without editing the file, section by section, e.g.
    ``{"cluster": {"k": 50}}``; an unknown key or a value out of range is refused with its name. Outputs
    still go to the run's own folder (``paths.figures_dir``), never over the published figures."""
    path = Path(params_path)
    if not path.is_absolute():
        path = paths.REPO_ROOT / path
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout, force=True)
    if not cache_hits:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_NoCacheHits())
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it tried first: noise
    params = load(path)
    if overrides:
        params = with_overrides(params, overrides, f"{path.name} overrides")
        print(f"overrides: {overrides}")
    params = with_resolved_root(params)
    show_tables_for_the_page()
    print(f"profile {params.profile}: {params.description}\ndata root: {paths.shown(params.data.root)}")
    if not os.environ.get(RECOMPUTE_ENV):  # a retrain uses none
        report = install(params)  # the shipped checkpoints your params ask for, verified, into the cache
        if report.installed or report.refused:
            print(report.summary())
    return params


def live_precision(params: Params) -> str:
    """The precision of the network passes a notebook runs itself, outside any stage (features to draw,
    heatmaps to show, one readable flip test): the profile's, except bf16 on a device without native bf16 (where
    ``auto`` would choose fp32). There bf16 is emulated, 20x slower for features on an AVX2 CPU and far more for
    PoisonCAM's masked passes (2026-12-08: one of notebook 04's 50 batches took over six minutes), and it
    rounds otherwise than native bf16 anyway, so these passes run in fp32 and their numbers may differ in the
    last digits from the published run's. The stages keep the profile's precision: their keys are the shipped
    ones, so they come from the cache."""
    from .compute import resolve_precision

    precision = params.compute.precision
    if precision == "bf16" and resolve_precision("auto") != "bf16":  # this device has no native bf16 (CPU or GPU)
        return "fp32"
    return precision


def live(params: Params) -> Params:
    """``params`` with ``live_precision`` for the notebook's own passes (never for a stage: its key would change)."""
    return dataclasses.replace(params, compute=dataclasses.replace(params.compute, precision=live_precision(params)))


def _rich_display():
    """IPython's ``display`` module where a notebook runs this, else None (plain text: print)."""
    try:
        from IPython import display, get_ipython
    except ImportError:  # pragma: no cover - IPython ships with the notebook extra
        return None
    return display if get_ipython() is not None else None


def show_markdown(text: str) -> None:
    """Render Markdown computed from the numbers in a notebook's output (plain text outside IPython)."""
    rich = _rich_display()
    if rich is None:
        print(text)
    else:
        rich.display(rich.Markdown(text))


# A table fits the book's text width with at most MAX_COLUMNS columns (``tests/test_notebooks.py`` checks every
# published output against it).
MAX_COLUMNS = 8


def _formatted(value: object) -> str:
    """One table cell as a reader wants it: 0.8125 -> 0.812, 97.84 -> 97.8, 12345.0 -> 12,345, True -> yes,
    a missing value -> an en dash."""
    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return "–"
        if float(value).is_integer() or abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return "–" if value is None else str(value).replace(" ± ", "\u00a0±\u00a0")  # "46.7 ± 37.8" never wraps


def split_columns(table, keys: list[str] | None = None, max_columns: int = MAX_COLUMNS) -> list:
    """``table`` as tables of at most ``max_columns`` columns each, every one repeating the ``keys`` columns
    (by default the leading columns that are not numbers, at most three), the rest in their order. A named
    index becomes a column; a plain row number is dropped."""
    import pandas as pd

    if not isinstance(table.index, pd.RangeIndex) or any(name is not None for name in table.index.names):
        table = table.reset_index(names=[name or "" for name in table.index.names])  # an unnamed index: no header
    table = table.copy()
    table.columns = [  # snake_case names wrap at the page's width as words
        (" ".join(map(str, c)).strip() if isinstance(c, tuple) else str(c)).replace("_", " ") for c in table.columns
    ]
    if keys is not None:
        keys = [str(k).replace("_", " ") for k in keys]
    else:
        keys = []
        for column in table.columns[:3]:
            if pd.api.types.is_numeric_dtype(table[column]) and not pd.api.types.is_bool_dtype(table[column]):
                break
            keys.append(column)
    if len(table.columns) <= max_columns:
        return [table]
    rest = [c for c in table.columns if c not in keys]
    width = max(1, max_columns - len(keys))
    parts = -(-len(rest) // width)
    size = -(-len(rest) // parts)  # parts of even width
    return [table[keys + rest[i : i + size]] for i in range(0, len(rest), size)]


def table_html(table, keys: list[str] | None = None) -> str:
    """HTML of ``table`` that fits the page: no index column, numbers formatted (``_formatted``), a table
    wider than ``MAX_COLUMNS`` split into several that repeat its key columns (``split_columns``)."""
    html = []
    for part in split_columns(table, keys):
        shown = part.astype(object).map(_formatted) if len(part) else part
        html.append(shown.to_html(index=False, escape=True, border=0, classes="fit"))
    return "\n".join(html)


def show_table(table, keys: list[str] | None = None) -> None:
    """Display ``table`` as ``table_html`` does (plain text outside IPython)."""
    rich = _rich_display()
    if rich is None:
        print(table.to_string(index=False))
    else:
        rich.display(rich.HTML(table_html(table, keys)))


def show_tables_for_the_page() -> None:
    """Make every DataFrame a cell displays render as ``table_html`` (no-op outside IPython)."""
    try:
        import pandas as pd
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return
    shell = get_ipython()
    if shell is not None:
        shell.display_formatter.formatters["text/html"].for_type(pd.DataFrame, table_html)


def gap_verdict(a, b, sds: float = 2.0) -> str:
    """``"higher"``, ``"lower"`` or ``"within noise"``: the mean of ``a`` against that of ``b`` (e.g. one model's
    metric over its probe seeds against another's), where noise is ``sds`` standard errors of the difference of
    the two means; ``"undecided (one seed)"`` where a side has one value. It says nothing of the SSL seed's
    noise, which is larger (notebook 07)."""
    import numpy as np

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:  # one seed (e.g. the smoke profile's probe) has no spread to judge a gap by
        return "undecided (one seed)"
    gap = a.mean() - b.mean()
    noise = sds * np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return "within noise" if abs(gap) <= noise else ("higher" if gap > 0 else "lower")


def figure_path(profile: str, name: str) -> Path:
    """A published file of ``figures/<profile>/`` (tables the runners write, read back by a notebook)."""
    return paths.published_dir(profile) / name


STEPS = {
    "01_attack": "attack",
    "02_ssl_training": "SSL training",
    "03_clustering": "clustering",
    "04_trigger_localization": "trigger localization",
    "05_search": "search",
    "06_poison_classifier": "poison classifier",
    "07_evaluation": "evaluation",
    "08_more_defenses": "more defenses",
}


def _stage_label(entry: dict) -> str:
    variant = ", ".join(f"{k}={v}" for section in entry["variant"].values() for k, v in section.items())
    return entry["stage"] + (f" ({variant})" if variant else "")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


LARGEST_SHOWN = 3  # the opening names this many of the stages a notebook reads, the costliest


def opening(params: Params, notebook: str) -> str:
    """Where the notebook sits in the pipeline and what it costs, with and without the shipped checkpoints,
    computed from the profile's last published record (``figures/<profile>/record.json``: its time and the
    stages it read) and the checkpoints' manifest (what each stage took when it was made)."""
    import json

    from .runners.checkpoints import read_manifest, shipped_dir

    steps = " → ".join(f"**{name}**" if key == notebook else name for key, name in STEPS.items())
    lines = [f"**Where this sits:** {steps}."]
    record_path = paths.published_dir(params.profile) / "record.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    seconds = record.get("notebook_seconds", {}).get(notebook)
    if seconds is None:
        lines.append(f"**Cost:** no published run of profile `{params.profile}` has recorded it yet.")
        return "\n\n".join(lines)
    used = record.get("notebook_stages", {}).get(notebook, [])
    manifest = read_manifest(params.profile) or {"stages": []}
    shipped = {f"{e['stage']}/{e['key']}": e for e in manifest["stages"]}
    heavy = [shipped[name] for name in used if name in shipped]
    text = (
        f"**Cost:** {seconds:.0f} s in the published `make reproduce` of this profile before this one (commit "
        f"`{record['commit'][:7]}`), reading {len(used)} cached stage results"
    )
    if heavy:
        total = sum(e["seconds"] for e in manifest["stages"])
        largest = sorted(heavy, key=lambda e: -e["seconds"])[:LARGEST_SHOWN]
        each = ", ".join(f"{_stage_label(e)} {_duration(e['seconds'])}" for e in largest)
        if len(heavy) > len(largest):
            rest = sum(e["seconds"] for e in heavy) - sum(e["seconds"] for e in largest)
            each = f"the largest: {each}; {len(heavy) - len(largest)} more take {_duration(rest)}"
        where = shipped_dir(params.profile)
        where = where.relative_to(paths.REPO_ROOT) if where.is_relative_to(paths.REPO_ROOT) else where
        text += (
            f". {len(heavy)} of them are shipped in `{where}/`, so a fresh clone computes only the rest, in "
            f"seconds. Without the shipped checkpoints they take {sum(e['seconds'] for e in heavy) / 60:.0f} min "
            f"of compute, one core each ({each}), as measured when they were made, plus what they need from "
            f"earlier notebooks; `make reproduce RETRAIN=1` computes every shipped stage ({len(shipped)} then), "
            f"{total / 3600:.1f} h of compute (at least {total / 7200:.1f} h on two cores)."
        )
    else:
        text += ", none of which needs a shipped checkpoint: they take seconds."
    lines.append(text)
    return "\n\n".join(lines)


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    import pandas as pd

    from .plotting import markdown_table

    return markdown_table(pd.DataFrame(rows, columns=list(header))).rstrip("\n")


def _trigger(a, h: int, w: int) -> tuple[int, str]:
    """The profile's trigger side in pixels and, where it pastes several, how many per image."""
    from .attack import trigger_side

    return trigger_side(a, h, w), (f", {a.n_copies} per image" if a.n_copies > 1 else "")


def _share(x: float) -> str:
    """A share as a percentage with as many decimals as it needs (0.5% stays 0.5%, 50% stays 50%)."""
    return f"{100 * x:.{0 if abs(100 * x - round(100 * x)) < 1e-9 else 1}f}%"


def attack_settings(params: Params, train_shape: tuple[int, int, int, int], n_poisoned: int) -> str:
    """The paper's attack (``params/paper.yaml``) beside the profile's, as a Markdown table computed from both
    files, so neither column can drift from what runs. ``train_shape``: the training pixels' ``N x C x H x W``."""
    from . import paper

    s, a = paper.setting, params.attack
    n, _, h, w = train_shape
    side, copies = _trigger(a, h, w)
    paper_side = s("trigger_px")
    rows = [
        ("data", f"{s('dataset')}: {s('train_images'):,} images of {s('image_px')} px",
         f"{params.data.dataset}: {n:,} images of {h} px"),
        ("trigger", "HTBA: a random colour grid, upsampled",
         "the same, seeded" if a.trigger == "random" else f"the image `{a.trigger}`"),
        ("trigger side", f"{paper_side} px ({_share(paper_side**2 / s('image_px') ** 2)} of the area)",
         f"{side} px ({_share(side * side / (h * w))} of the area){copies}"),
        ("poisoned", f"{_share(s('poison_rate'))} of the target category ({_share(s('poison_share'))} of the data)",
         f"{_share(a.poison_rate)} of the target category ({_share(n_poisoned / n)} of the data)"),
        ("training trigger's top-left corner", f"uniform in [{s('train_margin'):g} W, {1 - s('train_margin'):g} W - w]",
         f"uniform in [{a.train_margin:g} W, {1 - a.train_margin:g} W - w]"),
        ("patched validation images", f"every non-target image, one trigger, corner in [{s('val_margin'):g} W, "
         f"{1 - s('val_margin'):g} W - w]", f"every non-target image, one trigger, corner in [{a.val_margin:g} W, "
         f"{1 - a.val_margin:g} W - w]"),
    ]  # fmt: skip
    return _table(rows, ("setting", "paper (`params/paper.yaml`)", f"this profile (`{params.profile}`)"))


def training_settings(params: Params, train_shape: tuple[int, int, int, int]) -> str:
    """The paper's victim training (``params/paper.yaml``) beside the profile's ``ssl`` and ``compute``
    sections, as a Markdown table computed from both files."""
    from . import paper

    s, q, a = paper.setting, params.ssl, params.attack
    n, _, h, w = train_shape
    side, copies = _trigger(a, h, w)
    arch = q.arch if q.arch != "resnet18" else "ResNet-18" + (f" at {q.width / 64:g} width" if q.width != 64 else "")
    stem = f", stride-{q.stem_stride} stem" if q.stem_stride != 1 else ""
    rows = [
        ("data", f"{s('train_images'):,} images of {s('image_px')} px", f"{n:,} images of {h} px"),
        ("backbone", s("backbone"), f"{arch}{stem}"),
        ("training", f"{s('epochs')} epochs, {s('optimizer')}", f"{q.epochs} epochs, {q.optimizer} (lr {q.lr:g})"),
        ("trigger", f"{s('trigger_px')} px on {_share(s('poison_rate'))} of the target",
         f"{side} px on {_share(a.poison_rate)} of the target{copies}"),
        ("crops", f"scale {s('crop_min_scale'):g}-1", f"scale {q.crop_min_scale:g}-1"),
        ("precision", s("precision"), f"SSL pre-training {params.compute.ssl_precision}; every other pass "
         f"{params.compute.precision} (losses and scores in fp32)"),
    ]  # fmt: skip
    return _table(rows, ("setting", "paper (`params/paper.yaml`)", f"this profile (`{params.profile}`)"))


def short_commit(commit: str) -> str:
    """A commit's first 7 digits, marked where it was published from a tree with uncommitted changes."""
    return commit[:7] + (" (with uncommitted changes)" if commit.endswith("-dirty") else "")


def row_commits(profile: str, table_name: str) -> dict[str, str]:
    """The commit each published row of a generality table was computed at, from its record
    (``figures/<profile>/07_<table_name>_RECORD.md``, written by ``helpers.studies.generality.publish``); a
    commit published from a changed tree keeps its ``-dirty`` mark."""
    record = paths.published_dir(profile) / f"07_{table_name}_RECORD.md"
    if not record.is_file():
        return {}
    text = record.read_text()
    rows = dict(re.findall(r"^- `([\w-]+)`: computed at commit `([0-9a-f]+(?:-dirty)?)`", text, flags=re.M))
    if not rows:  # a record written before rows were kept: one commit for the rows its command names
        commit = re.search(r"published at commit `([0-9a-f]+(?:-dirty)?)`", text)
        rows = dict.fromkeys(re.findall(r"--run ([\w-]+)", text), commit.group(1)) if commit else {}
    return rows
