"""Do a search's top-k patches agree with each other? A trigger pasted on many images should give top-k
patches that look alike; ordinary image parts, as on a clean training set, should not.

    python -m helpers.studies.agreement --publish cifar10 [--run NAME ...]   # one table in figures/<profile>/

An exploratory diagnostic for the poison classifier's false removals (notebook 06, "A pasted square is not a
trigger"): the classifier is trained on the top-k patches whether or not they show a trigger, and on a clean
training set it removes images all the same (paper Table 10). Here each cached search (PatchSearch's and
PoisonCAM's, on the generality configurations ``--run`` names and on the clean training set) gets one
number from its saved top patches alone, reading nothing of the attack: the median over pairs of the best
normalised cross-correlation of the two patches over shifts (``shift_ncc``), so that one trigger cut at two
offsets still agrees. Beside it stands the search's top-k accuracy (ground truth, for evaluation only).

No rule is taken from it here: every configuration in the table was in view when it was first measured
(2026-11-30), so a gate built on it ("no trigger found, remove nothing") must be judged on configurations
made after it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .. import params as params_mod
from .. import paths, studies

TOP_K = 20  # the top-k patches compared: the paper's top-20 accuracy looks at the same ones
MIN_OVERLAP = 0.5  # shifts where the two windows overlap on at least half of their area


def shift_ncc(a: np.ndarray, b: np.ndarray, min_overlap: float = MIN_OVERLAP) -> float:
    """The highest normalised cross-correlation of two ``w x w x C`` patches over the shifts where they overlap
    on at least ``min_overlap`` of the area; -1 where every overlap is flat (no variation to correlate)."""
    w = a.shape[0]
    best = -1.0
    for dy in range(-w + 1, w):
        for dx in range(-w + 1, w):
            h, v = w - abs(dy), w - abs(dx)
            if h * v < min_overlap * w * w:
                continue
            pa = a[max(0, dy) : max(0, dy) + h, max(0, dx) : max(0, dx) + v].ravel()
            pb = b[max(0, -dy) : max(0, -dy) + h, max(0, -dx) : max(0, -dx) + v].ravel()
            pa, pb = pa - pa.mean(), pb - pb.mean()
            norm = float(np.linalg.norm(pa) * np.linalg.norm(pb))
            if norm > 1e-6:
                best = max(best, float(pa @ pb) / norm)
    return best


def agreement(patches: list[np.ndarray]) -> float:
    """The median of ``shift_ncc`` over every pair of ``patches``."""
    pairs = [shift_ncc(a, b) for i, a in enumerate(patches) for b in patches[i + 1 :]]
    return float(np.median(pairs))


def top_patches(search_dir: Path, k: int = TOP_K) -> list[np.ndarray]:
    """The first ``k`` patches a search saved (``top_patches/<rank>_<index>.png``), as floats in [0, 1]."""
    from PIL import Image

    files = sorted((search_dir / "top_patches").glob("*.png"))[:k]
    if len(files) < k:
        raise SystemExit(f"{search_dir / 'top_patches'}: {len(files)} patches, fewer than the {k} compared")
    return [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f in files]


def rows(names: list[str], base: Path, k: int = TOP_K) -> list[dict]:
    """One row per cached search: each configuration's and method's, then each method's on the clean set."""
    from ..search import load_search, with_method
    from . import generality

    out = []
    for name in names:
        params, _, poison, _ = generality._ground_truth(name, base)
        for method, label in generality.METHODS.items():
            folder = generality._cached(with_method(params, method), "search_poisoned")
            if folder is None:  # this method was not run on this configuration
                continue
            found = load_search(folder)
            out.append(
                {
                    "training set": name,
                    "method": label,
                    "w": found["window"],
                    f"top-{k} (%)": 100 * float(poison[found["ranking"][:k]].mean()),
                    "agreement": agreement(top_patches(folder, k)),
                }
            )
    default = params_mod.with_resolved_root(params_mod.load(base))
    for method, label in generality.METHODS.items():
        folder = generality._cached(with_method(default, method), "search_clean")
        if folder is not None:
            w = load_search(folder)["window"]
            row = {"training set": "clean (no poisons)", "method": label, "w": w, f"top-{k} (%)": float("nan")}
            out.append(row | {"agreement": agreement(top_patches(folder, k))})
    return out


def publish(profile: str, names: list[str], base: Path) -> pd.DataFrame:
    table = pd.DataFrame(rows(names, base))
    general = pd.read_csv(paths.published_dir(profile) / "07_generality.csv")
    planted = dict(zip(general["configuration"], general["backdoor present"], strict=True))
    table["backdoor present"] = [planted.get(name, False) for name in table["training set"]]
    table["agreement"] = table["agreement"].round(3)
    studies.publish_table(
        table,
        profile,
        "06_poison_classifier",
        "topk_agreement",
        "Top-k agreement of the cached searches",
        f"python -m helpers.studies.agreement {' '.join(sys.argv[1:])}",
        [
            f"- the top {TOP_K} patches of each search; the median over pairs of the best normalised "
            f"cross-correlation over shifts with at least {MIN_OVERLAP:.0%} overlap",
            "- exploratory: every configuration here was in view when the measure was first made; no rule is taken"
            " from it",
        ],
    )
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(paths.PARAMS_DIR / "cifar10.yaml"))
    parser.add_argument("--run", action="append", default=[], metavar="NAME")
    parser.add_argument("--publish", metavar="PROFILE", required=True)
    args = parser.parse_args(argv)
    print(publish(args.publish, args.run or ["default"], Path(args.base)).to_string())


if __name__ == "__main__":
    main()
