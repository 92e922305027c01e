"""Figures and tables: one ``savefig`` / ``save_table`` that write a notebook's outputs to ``paths.figures_dir``
(the run's folder; ``figures/<profile>/`` only when ``helpers.runners.reproduce --publish`` runs the default
profile) or, for the runners' ``--publish``, to ``paths.published_dir`` (``published=True``)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Rectangle

from . import io, paths


def figure_path(profile: str, notebook: str, name: str, suffix: str, published: bool = False) -> Path:
    folder = paths.published_dir(profile) if published else paths.figures_dir(profile)
    return folder / f"{notebook}_{name}{suffix}"


def savefig(fig: plt.Figure, profile: str, notebook: str, name: str, dpi: int = 150, published: bool = False) -> None:
    """Write ``<notebook>_<name>.png`` and ``.pdf`` (atomically) to the output folder (``figure_path``).
    Returns nothing, so that a notebook cell ending with it shows the figure and no file path."""
    png = figure_path(profile, notebook, name, ".png", published)
    io.atomic_write(png, lambda p: fig.savefig(p, dpi=dpi, bbox_inches="tight", format="png"))
    io.atomic_write(  # no creation date: an unchanged figure stays byte-identical across runs
        png.with_suffix(".pdf"),
        lambda p: fig.savefig(p, bbox_inches="tight", format="pdf", metadata={"CreationDate": None}),
    )


def save_table(table: pd.DataFrame, profile: str, notebook: str, name: str, published: bool = False) -> Path:
    """Write ``<notebook>_<name>.csv`` and a Markdown copy ``.md`` to the output folder (``figure_path``)."""
    csv = figure_path(profile, notebook, name, ".csv", published)
    io.write_text(csv, table.to_csv(index=False))
    io.write_text(csv.with_suffix(".md"), markdown_table(table))
    return csv


def markdown_table(table: pd.DataFrame, float_format: str = "{:.4g}") -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""

    def cell(value: object) -> str:
        return float_format.format(value) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def show_images(
    pixels: np.ndarray | list[np.ndarray],
    titles: list[str] | None = None,
    boxes: np.ndarray | None = None,
    ncols: int = 8,
    scale: float = 1.4,
    box_color: str = "lime",
) -> plt.Figure:
    """A grid of ``N x 3 x H x W`` uint8 images (or a list of ``3 x H x W`` of any sizes), with optional
    ``N x copies x 4`` boxes (x, y, w, h) drawn."""
    n = len(pixels)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(scale * ncols, scale * nrows + 0.3), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(np.asarray(pixels[k]).transpose(1, 2, 0), interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[k], fontsize=7)
        if boxes is not None:
            for x, y, w, h in boxes[k]:
                ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor=box_color, linewidth=1.2))
    fig.tight_layout()
    return fig
