"""The papers' published numbers, read from ``params/paper.yaml``: the one place they are written.

Notebooks set our measurements beside them (Tables 2-4 and 8-10, Figure 3) and set the paper's attack and
training beside the profile's; none types a paper's number. A missing file, table, row or field is an error
that names the file and the key.
"""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

from . import paths

PAPER_FILE = paths.PARAMS_DIR / "paper.yaml"
SECTIONS = ("sources", "settings", "figure3_potency_reduction", "tables")


class PaperError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0])


@functools.cache
def load(path: Path = PAPER_FILE) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise PaperError(f"{path}: the published numbers are missing") from None
    except yaml.YAMLError as e:
        raise PaperError(f"{path}: not valid YAML ({e})") from None
    missing = [s for s in SECTIONS if not isinstance(data, dict) or s not in data]
    if missing:
        raise PaperError(f"{path}: no section {', '.join(missing)}")
    for name, t in data["tables"].items():
        for key in ("source", "columns", "rows"):
            if key not in t:
                raise PaperError(f"{path}: tables.{name} has no '{key}'")
        for row, values in t["rows"].items():
            if len(values) != len(t["columns"]):
                raise PaperError(
                    f"{path}: tables.{name}.rows.{row} has {len(values)} values for {len(t['columns'])} columns"
                )
    return data


def _get(section: str, name: str, path: Path) -> dict:
    found = load(path)[section]
    if name not in found:
        raise PaperError(f"{path}: no {section}.{name} (it has: {', '.join(found)})")
    return found[name]


def table(name: str, path: Path = PAPER_FILE) -> dict[str, tuple]:
    """A published table's rows: row name -> its values, in ``columns(name)``'s order."""
    return {row: tuple(values) for row, values in _get("tables", name, path)["rows"].items()}


def columns(name: str, path: Path = PAPER_FILE) -> list[str]:
    return list(_get("tables", name, path)["columns"])


def entry(name: str, path: Path = PAPER_FILE) -> dict:
    """A table's whole entry: its source, what it is about, its columns and rows, and any extra field."""
    return dict(_get("tables", name, path))


def setting(name: str, path: Path = PAPER_FILE):
    """One value of the paper's attack and training (``settings``)."""
    found = load(path)["settings"]
    if name not in found:
        raise PaperError(f"{path}: no settings.{name} (it has: {', '.join(found)})")
    return found[name]


def potency_reduction(path: Path = PAPER_FILE) -> dict[str, float]:
    """Figure 3: the share by which i-CutMix lowers a clean model's total patch potency, by setting."""
    return {k: v for k, v in load(path)["figure3_potency_reduction"].items() if k != "source"}


def cite(source: str, path: Path = PAPER_FILE) -> str:
    """A Markdown link to a source: its citation, linked to its arXiv page."""
    s = _get("sources", source, path)
    return f"[{s['cite']}]({s['url']})"
