"""Does bf16 change anything that matters? The profile's clean and backdoored models and both defenses,
computed in fp32 and in bf16 autocast, side by side.

    python -m helpers.studies.precision --params params/cifar10.yaml --run      # compute what is missing
    python -m helpers.studies.precision --params params/cifar10.yaml --publish  # write the table
    python -m helpers.studies.precision --params params/cifar10.yaml --publish --seeds 0 1  # and over seeds

``--run`` computes, for each precision, the pipeline tasks the table needs (both SSL models, their
evaluation, both defenses on the poisoned set) side by side through ``helpers.runners.pipeline``; everything is a
cached stage, so what ``make reproduce`` already computed in the profile's precision is a cache hit.
``--publish`` writes ``figures/<profile>/02_precision_fp32_vs_bf16.{csv,md}``: per quantity the fp32 and the
bf16 value, their difference and, where the quantity has one, the spread over the probe's seeds (the
difference is flagged when it exceeds that spread).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import paths
from ..params import Params
from ..runners import pipeline

PRECISIONS = ("fp32", "bf16")
TASKS = ["eval_clean", "eval_poisoned", "defense_patchsearch_poisoned", "defense_poisoncam_poisoned"]
FRACTION = 0.1  # the probe's label fraction of the comparison (Table 2's main column)


def with_precision(params: Params, precision: str) -> Params:
    """Every network pass in ``precision``, SSL pre-training included."""
    compute = dataclasses.replace(params.compute, precision=precision, ssl_precision=precision)
    return dataclasses.replace(params, compute=compute)


def _stage_minutes(stage_path: Path) -> float:
    return json.loads((stage_path / "stage.json").read_text())["seconds"] / 60


def measure(params: Params) -> list[dict]:
    """One row per quantity: its value in each precision (everything read from the cache)."""
    from ..attack import run_attack
    from ..classify import classifier_stage, detection_metrics
    from ..cluster import cluster_stage, poison_concentration
    from ..data import load_data
    from ..evaluate import evaluate_stage
    from ..search import load_search, search_stage, with_method
    from ..ssl import train_stage

    data = load_data(params, progress=False)
    attack = run_attack(params, data, progress=False)
    poison = attack.poison_mask(len(data.train.images))
    values: dict[str, dict[str, tuple[float, float | None]]] = {}  # quantity -> precision -> (value, spread)

    def put(name: str, precision: str, value: float, spread: float | None = None) -> None:
        values.setdefault(name, {})[precision] = (float(value), spread)

    for precision in PRECISIONS:
        p = with_precision(params, precision)
        for variant in ("clean", "poisoned"):
            model_dir = train_stage(p, variant, progress=False)
            history = pd.DataFrame(json.loads((model_dir / "history.json").read_text()))
            put(f"{variant}: SSL training (min)", precision, history["seconds"].sum() / 60)
            put(f"{variant}: SSL training (img/s)", precision, history["images_per_s"].mean())
            _, probe, knn = evaluate_stage(p, variant, progress=False)
            t = probe[np.isclose(probe["labels"], FRACTION)]
            for col, label in (("clean_acc", "probe acc"), ("asr", "probe ASR")):
                put(
                    f"{variant}: {label} {FRACTION:.0%} labels (%)",
                    precision,
                    100 * t[col].mean(),
                    100 * t[col].std(ddof=0),
                )
            put(f"{variant}: kNN acc (%)", precision, 100 * knn["val"]["acc"])
            put(f"{variant}: kNN ASR (%)", precision, 100 * knn["patched"]["asr"])
        assignment = np.load(cluster_stage(p, "poisoned", progress=False) / "clustering.npz")["assignment"]
        share = poison_concentration(assignment, poison)["poison_share_in_rich_clusters"]
        put("poisoned: poisons in >= 50%-poisoned clusters (%)", precision, 100 * share)
        for method, label in (("patchsearch", "PatchSearch"), ("poisoncam", "PoisonCAM")):
            pm = with_method(p, method)
            search_dir = search_stage(pm, "poisoned", progress=False)
            clf_dir = classifier_stage(pm, "poisoned", progress=False)
            found = load_search(search_dir)
            removed = np.load(clf_dir / "classifier.npz")["removed"]
            boxes = attack.boxes_of(np.flatnonzero(found["scored"] & poison))
            row = detection_metrics(found, removed, poison, boxes, int(data.train.pixels.shape[-1]))
            for key in ("top-20 acc (%)", "recall (%)", "precision (%)", "total removed"):
                put(f"{label}: {key}", precision, row[key])
            put(f"{label}: search (min)", precision, _stage_minutes(search_dir))
            put(f"{label}: poison classifier (min)", precision, _stage_minutes(clf_dir))
    rows = []
    for name, by_precision in values.items():
        (a, spread_a), (b, spread_b) = by_precision["fp32"], by_precision["bf16"]
        spread = max(spread_a, spread_b) if spread_a is not None else None
        rows.append(
            {
                "quantity": name,
                "fp32": round(a, 1),
                "bf16": round(b, 1),
                "bf16 - fp32": round(b - a, 1),
                "probe seed spread (std)": round(spread, 1) if spread is not None else None,
                "beyond the spread": (abs(b - a) > spread) if spread is not None else None,
            }
        )
    return rows


def training_seed_rows(params: Params, seeds: list[int]) -> list[dict]:
    """The backdoored model of each (precision, SSL training seed): probe and kNN metrics (trains what is
    missing; the spread over training seeds is what a precision's effect is weighed against)."""
    from ..evaluate import evaluate_stage

    rows = []
    for precision in PRECISIONS:
        for seed in seeds:
            p = with_precision(params, precision)
            p = dataclasses.replace(p, ssl=dataclasses.replace(p.ssl, seed=seed))
            path, probe, knn = evaluate_stage(p, "poisoned", progress=False)
            t = probe[np.isclose(probe["labels"], FRACTION)]
            rows.append(
                {
                    "SSL pre-training precision": precision,
                    "SSL training seed": seed,
                    f"probe acc {FRACTION:.0%} (%)": round(100 * t["clean_acc"].mean(), 1),
                    f"probe ASR {FRACTION:.0%} (%)": round(100 * t["asr"].mean(), 1),
                    "probe ASR std over probe seeds": round(100 * t["asr"].std(ddof=0), 1),
                    "kNN acc (%)": round(100 * knn["val"]["acc"], 1),
                    "kNN ASR (%)": round(100 * knn["patched"]["asr"], 1),
                    "eval stage": path.name,
                }
            )
    return rows


def publish(params: Params, seeds: list[int] | None = None) -> list[Path]:
    """Write the fp32-vs-bf16 table and, with ``seeds``, the table over SSL training seeds."""
    from ..plotting import save_table

    table = pd.DataFrame(measure(params))
    written = [save_table(table, params.profile, "02_precision", "fp32_vs_bf16", published=True)]
    if seeds:
        table = pd.DataFrame(training_seed_rows(params, seeds))
        written.append(save_table(table, params.profile, "02_precision", "training_seeds", published=True))
    return [path.with_suffix(".md") for path in written]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(paths.PARAMS_DIR / "cifar10.yaml"))
    parser.add_argument("--run", action="store_true", help="compute the missing stages in both precisions")
    parser.add_argument("--publish", action="store_true", help="write the comparison table")
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=None, help="with --publish: also the table over these SSL seeds"
    )
    args = parser.parse_args(argv)
    from ..notebook import setup

    params = setup(args.params)
    if args.run:
        for precision in PRECISIONS:
            log_dir = paths.runs_dir() / "precision_study" / f"{time.strftime('%Y%m%dT%H%M%S')}-{precision}"
            pipeline.run_all(Path(args.params), log_dir, only=TASKS, precision=precision)
    if args.publish:
        for path in publish(params, args.seeds):
            print(path.read_text())


if __name__ == "__main__":
    main()
