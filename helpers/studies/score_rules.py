"""Which flip-test count tells poisons from clean candidates? Every count on one sample, per window side.

    python -m helpers.studies.score_rules --run NAME [--run NAME ...] [--method poisoncam]   # compute
    python -m helpers.studies.score_rules --publish cifar10 [--run NAME ...]                 # one table in figures/

The search scores the images it visits, and what it visits depends on the scores, so two counts are not
compared by their searches alone. Here every count scores the same images: the first ``PER_CLUSTER``
images of every cluster in the defense's own order (``defense_ids``), a sample that reads nothing of the
attack. For each side ``w`` of the profile's sweep, each image's candidate window (its method's heatmap) is
pasted on the flip-test images at the search's places, and so are two controls at the same places: a flat
square of the candidate's mean colour (``search.flat_patches``) and a mid-grey square. From the three
destinations every count of ``helpers.search.SCORE_RULES`` follows, and one more: ``changed_vs_grey``
(changes that a grey square does not cause). The table gives, per configuration, count and side, the AUC
of poisons against clean candidates (ground truth, for evaluation only; 0.5 is chance) and the top-20
accuracy within the sample beside the sample's poison rate (chance).

A configuration is the profile itself (``default``) or one of its ``variants`` (other SSL seeds, BYOL).
``SEEN`` names the configurations that were in view when a count was chosen for a profile; the others
judge that choice.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .. import io, paths, studies
from .. import params as params_mod

PER_CLUSTER = 4  # sampled images per cluster: 400 of the cifar10 profile's 10,000 (about 10% poisons)
SEEN = ("default",)  # in view when the cifar10-gpu profile's poisoncam_score (into_vs_flat) was chosen
COUNTS = ("changed", "into", "changed_vs_flat", "into_vs_flat", "changed_vs_grey")


def configuration(base: params_mod.Params, name: str) -> params_mod.Params:
    """The profile (``default``) or its variant ``name``."""
    return base if name == "default" else params_mod.with_variant(base, name, "score_study")


def result_path(params: params_mod.Params, name: str, method: str) -> Path:
    from ..cache import stage_dir
    from ..search import with_method

    cluster_key = stage_dir(with_method(params, method), "cluster_poisoned").name
    return paths.artifacts_dir() / "studies" / "score_rules" / f"{method}_{name}_{cluster_key}.npz"


def run(params: params_mod.Params, name: str, method: str) -> Path:
    """Destinations of the flip images under each sampled candidate and its two controls, every side."""
    import torch

    from ..attack import run_attack
    from ..data import load_data
    from ..localize import best_windows, cut_patches
    from ..search import (
        defense_context,
        flat_patches,
        flip_destinations,
        heatmaps,
        paste_locations,
        search_masks,
        with_method,
    )

    p = with_method(params, method)
    out = result_path(params, name, method)
    if out.is_file():
        return out
    data = load_data(p, progress=False)
    poison = run_attack(p, data, progress=False).poison_mask(len(data.train.images))
    ctx = defense_context(p, "poisoned", progress=False)
    order = np.argsort(ctx.ids, kind="stable")
    clusters = np.unique(ctx.assignment)
    idx = np.concatenate([order[ctx.assignment[order] == k][:PER_CLUSTER] for k in clusters])
    maps = heatmaps(ctx, method, idx, masks=search_masks(ctx) if method == "poisoncam" else None)
    flip_pixels = ctx.pixels[torch.as_tensor(ctx.flip_idx)]
    arrays = {"idx": idx, "poison": poison[idx], "ids": ctx.ids[idx], "cluster": ctx.assignment[idx]}
    arrays["before"] = ctx.assignment[ctx.flip_idx]
    for w in p.search.window_sweep:
        xs, ys = best_windows(maps, w)
        patches = cut_patches(ctx.pixels[torch.as_tensor(idx)], xs, ys, w)
        places = paste_locations(ctx.ids[idx], len(flip_pixels), ctx.size, ctx.size, w, p.search.seed)
        grey = torch.full_like(patches, 128)
        for label, pasted in (("after", patches), ("flat", flat_patches(patches)), ("grey", grey)):
            arrays[f"{label}_w{w}"] = flip_destinations(ctx.model, ctx.normalise, flip_pixels, pasted, places).numpy()
        print(f"{name} {method} w = {w}: done", flush=True)
    io.save_npz(out, **arrays)
    return out


def counts(z, w: int) -> dict[str, np.ndarray]:
    """Each count of every sampled candidate at side ``w``, by the flip test's own rule (``_flip_hits``);
    ``changed_vs_grey`` is ``changed_vs_flat`` with the grey square as the control."""
    import torch

    from ..search import SCORE_RULES, _flip_hits

    after, flat, grey = (torch.from_numpy(z[f"{label}_w{w}"]) for label in ("after", "flat", "grey"))
    before, own = torch.from_numpy(z["before"])[None], torch.from_numpy(z["cluster"])[:, None]
    out = {rule: _flip_hits(before, after, own, rule, flat).sum(1).numpy() for rule in SCORE_RULES if rule in COUNTS}
    out["changed_vs_grey"] = _flip_hits(before, after, own, "changed_vs_flat", grey).sum(1).numpy()
    return {count: out[count] for count in COUNTS}


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(a poison's score > a clean candidate's), ties counted half."""
    pos, neg = scores[positive][:, None], scores[~positive][None]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def rows(z, name: str, method: str, sweep: list[int]) -> list[dict]:
    poison = z["poison"].astype(bool)
    out = []
    for w in sweep:
        for count, s in counts(z, w).items():
            top = np.lexsort((z["ids"], -s))[:20]  # highest first, ties by the defense's own order
            out.append(
                {
                    "configuration": name,
                    "seen": name in SEEN,
                    "method": method,
                    "count": count,
                    "window": w,
                    "AUC": round(auc(s, poison), 3),
                    "top-20 acc (%)": 100 * poison[top].mean(),
                    "chance (%)": round(100 * poison.mean(), 1),
                    "poison mean": round(float(s[poison].mean()), 2),
                    "clean mean": round(float(s[~poison].mean()), 2),
                }
            )
    return out


def publish(base: params_mod.Params, names: list[str], method: str) -> pd.DataFrame:
    from ..plotting import save_table

    found = []
    for name in names:
        path = result_path(configuration(base, name), name, method)
        if not path.is_file():
            raise SystemExit(
                f"{path}: no result for {name}; run `python -m helpers.studies.score_rules --run {name}` first"
            )
        with np.load(path) as z:
            found += rows(z, name, method, base.search.window_sweep)
    table = pd.DataFrame(found)
    wide = table.pivot_table(index=["configuration", "seen", "window"], columns="count", values="AUC").reset_index()
    save_table(table, base.profile, "05_search", "score_rules_long", published=True)
    wide = wide[["configuration", "seen", "window", *COUNTS]]
    save_table(wide, base.profile, "05_search", "score_rules", published=True)
    studies.write_record(
        base.profile,
        "05_search_score_rules",
        "Flip-test counts on one sample",
        f"python -m helpers.studies.score_rules {' '.join(sys.argv[1:])}",
        [
            f"- {method}'s heatmaps; {PER_CLUSTER} images per cluster; configurations seen while choosing a count: "
            f"{', '.join(SEEN)}"
        ],
    )
    return table


def main(argv: list[str] | None = None) -> None:
    parser = studies.parser(__doc__, threads=1)
    parser.add_argument("--run", action="append", default=[], metavar="NAME")
    parser.add_argument("--method", default="poisoncam", choices=["patchsearch", "poisoncam"])
    args, base = studies.parse(parser, argv)
    if args.publish:
        print(publish(base, args.run or ["default"], args.method).to_string())
        return
    for name in args.run or ["default"]:
        print(run(configuration(base, name), name, args.method))


if __name__ == "__main__":
    main()
