"""What every notebook does first: load the profile, resolve the data root, set up logging."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from . import paths
from .cache import RECOMPUTE_ENV
from .params import Params, load, with_overrides, with_resolved_root
from .runners.checkpoints import install


def setup(params_path: str | Path, overrides: dict | None = None) -> Params:
    """Load ``params_path`` (relative paths are taken from the repository root), resolve the data root,
    log cache hits and misses to the notebook's output, and install the profile's shipped checkpoints
    (``helpers.runners.checkpoints``) that match the params, so that a notebook opened on a fresh clone trains nothing.

    ``overrides`` changes keys for an experiment without editing the file, section by section, e.g.
    ``{"cluster": {"k": 50}}``; an unknown key or a value out of range is refused with its name. Outputs
    still go to the run's own folder (``paths.figures_dir``), never over the published figures."""
    path = Path(params_path)
    if not path.is_absolute():
        path = paths.REPO_ROOT / path
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout, force=True)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it tried first: noise
    params = load(path)
    if overrides:
        params = with_overrides(params, overrides, f"{path.name} overrides")
        print(f"overrides: {overrides}")
    params = with_resolved_root(params)
    print(f"profile {params.profile}: {params.description}\ndata root: {params.data.root}")
    if not os.environ.get(RECOMPUTE_ENV):  # a retrain uses none
        report = install(params)  # the shipped checkpoints your params ask for, verified, into the cache
        if report.installed or report.refused:
            print(report.summary())
    return params


def show_markdown(text: str) -> None:
    """Render Markdown computed from the numbers in a notebook's output (plain text outside IPython)."""
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:  # pragma: no cover - IPython ships with the notebook extra
        print(text)
        return
    if get_ipython() is None:
        print(text)
    else:
        display(Markdown(text))


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
        f"**Cost:** {seconds:.0f} s in the last `make reproduce` of this profile (commit "
        f"`{record['commit'][:7]}`), reading {len(used)} cached stage results"
    )
    if heavy:
        total = sum(e["seconds"] for e in manifest["stages"])
        each = ", ".join(f"{_stage_label(e)} {_duration(e['seconds'])}" for e in heavy)
        where = shipped_dir(params.profile)
        where = where.relative_to(paths.REPO_ROOT) if where.is_relative_to(paths.REPO_ROOT) else where
        text += (
            f". {len(heavy)} of them are shipped in `{where}/`, so a fresh clone computes only the rest, in "
            f"seconds. Without the shipped checkpoints they take {sum(e['seconds'] for e in heavy) / 60:.0f} min "
            f"of compute, one core each ({each}), as measured when they were made, plus what they need from "
            f"earlier notebooks; `make reproduce RETRAIN=1` computes all {len(shipped)} shipped stages, "
            f"{total / 3600:.1f} h of compute (at least {total / 7200:.1f} h on two cores)."
        )
    else:
        text += ", none of which needs a shipped checkpoint: they take seconds."
    lines.append(text)
    return "\n\n".join(lines)
