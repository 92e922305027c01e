"""What every notebook does first: load the profile, resolve the data root, set up logging."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from . import paths
from .params import Params, from_dict, load, with_resolved_root


def setup(params_path: str | Path, overrides: dict | None = None) -> Params:
    """Load ``params_path`` (relative paths are taken from the repository root), resolve the data root,
    and log cache hits and misses to the notebook's output.

    ``overrides`` changes keys for an experiment without editing the file, section by section, e.g.
    ``{"cluster": {"k": 50}}``; an unknown key or a value out of range is refused with its name. Outputs
    still go to the run's own folder (``paths.figures_dir``), never over the published figures."""
    path = Path(params_path)
    if not path.is_absolute():
        path = paths.REPO_ROOT / path
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout, force=True)
    params = load(path)
    if overrides:
        raw = params.to_dict()
        for section, values in overrides.items():
            if not (isinstance(values, dict) and isinstance(raw.get(section), dict)):
                example = "{'cluster': {'k': 50}}"
                raise ValueError(f"overrides: {section!r} is not a section of {path.name} (e.g. {example})")
            raw[section] = {**raw[section], **values}
        params = from_dict(raw, f"{path} + overrides {overrides}")
        print(f"overrides: {overrides}")
    params = with_resolved_root(params)
    print(f"profile {params.profile}: {params.description}\ndata root: {params.data.root}")
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
