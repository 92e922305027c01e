"""The potency of clean patches (PatchSearch paper, Figure 3): PatchSearch used as an interpretation tool.

With a *clean* model, every training image's candidate patch (its Grad-CAM window, as in the search) is
scored by the flip test, with no iterative search: its poison score is how many flip-test images it pulls
into its own cluster. A category's potency is the largest score among its images; the total potency is the
sum over categories. The paper finds that i-CutMix lowers it (by 71.3% for BYOL ResNet-18): a model trained
with i-CutMix relies less on any small region, which is also why i-CutMix weakens patch triggers.

The window side is the one the PatchSearch search of the clean set picked blind (``search_clean``), the
same for the models with and without i-CutMix, so that both are scored alike.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import io
from .cache import cached_stage
from .params import Params
from .search import Scorer, defense_context, load_search, search_stage, with_method

CHUNK = 500  # images scored per flip-test call: bounds the memory of the pasted batch


def category_potency(scores: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per category: the largest score among its images, and which image has it (ties: the first)."""
    best, where = np.zeros(n_classes), np.full(n_classes, -1, dtype=np.int64)
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        if len(members):
            top = members[np.argmax(scores[members])]
            best[c], where[c] = scores[top], top
    return best, where


def potency_window(params: Params, progress: bool = True) -> int:
    """The window side PatchSearch's search picked blind on the clean set with the profile's clean model."""
    clean = dataclasses.replace(params, ssl=dataclasses.replace(params.ssl, icutmix=False))
    return int(load_search(search_stage(with_method(clean, "patchsearch"), "clean", progress))["window"])


def potency_stage(params: Params, icutmix: bool = False, progress: bool = True) -> Path:
    """The cached ``potency_clean`` stage of the clean model (with or without i-CutMix): ``potency.npz`` (every
    training image's score, window corner and label; the window side) and ``categories.csv`` (each
    category's potency and the image that has it)."""
    w = potency_window(params, progress)
    params = with_method(
        dataclasses.replace(params, ssl=dataclasses.replace(params.ssl, icutmix=icutmix)), "patchsearch"
    )
    params = dataclasses.replace(params, search=dataclasses.replace(params.search, window_px=w))

    def compute(out: Path, final: Path) -> None:
        start = time.perf_counter()
        ctx = defense_context(params, "clean", progress)
        scorer = Scorer(ctx, "patchsearch", [w])
        n = len(ctx.pixels)
        scores = np.zeros(n)
        for first in tqdm(range(0, n, CHUNK), desc=f"potency (w = {w})", disable=not progress):
            idx = np.arange(first, min(n, first + CHUNK))
            scores[idx] = scorer.score(idx, w)
        labels = ctx.images.labels
        best, where = category_potency(scores, labels, len(ctx.images.classes))
        io.save_npz(out / "potency.npz", scores=scores, corners=scorer.corner[w], labels=labels, window=np.array(w))
        table = pd.DataFrame({"category": ctx.images.classes, "potency": best, "image": where})
        io.write_text(out / "categories.csv", table.to_csv(index=False))
        io.write_json(
            out / "summary.json", {"window": w, "total": float(best.sum()), "seconds": time.perf_counter() - start}
        )

    return cached_stage("potency_clean", params, compute).path
