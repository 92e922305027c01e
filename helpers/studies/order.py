"""How much do a profile's detection numbers owe to the order of its files? (issue 22, item 2)

    python -m helpers.studies.order --params P.yaml --run          # the defense again, cluster.order: content
    python -m helpers.studies.order --params P.yaml --publish PROFILE

The defense draws images and breaks ties in the order of ``cluster.order``'s ids. ``file`` is the index in the
file list, which is sorted by class: the first classes win every tie for the top-k and the last ones every
tie for the proxy negatives (the bottom of the scored images). ``content`` is a seeded hash of each image's
pixels, the same whatever the order of the files (``tests/test_order.py``). A profile that ran with one
order is run with the other on the same SSL model (clustering, both searches, both classifiers), and the
table sets them side by side, per method: the window picked, top-20 accuracy as ranked and with the ties at
the 20th place broken at random (``search.tie_fair_top_k_accuracy``, which no order can move), the images
tied there, the poisons among the proxy negatives, and the classifier's removals under both ensemble rules.
The ground truth is used for evaluation only.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from .. import params as params_mod
from .. import studies

ORDERS = ("file", "content")
METHODS = ("patchsearch", "poisoncam")


def with_order(params: params_mod.Params, order: str) -> params_mod.Params:
    return dataclasses.replace(params, cluster=dataclasses.replace(params.cluster, order=order))


def run(params: params_mod.Params, methods: list[str]) -> None:
    from ..classify import classifier_stage
    from ..search import with_method

    for order in ORDERS:
        for method in methods:
            print(f"== {order} / {method}", flush=True)
            classifier_stage(with_method(with_order(params, order), method), "poisoned")


def rows(params: params_mod.Params, methods: list[str], k: int = 20) -> tuple[pd.DataFrame, list[str]]:
    """The table, and the ``stage/key`` of every classifier it reads (a row per order and method run)."""
    from ..attack import run_attack
    from ..cache import MARKER, stage_dir
    from ..classify import ensemble_removed, proxy_validation
    from ..data import load_data
    from ..search import kth_place, load_search, tie_fair_top_k_accuracy, top_k_accuracy, with_method

    data = load_data(params, progress=False)
    labels = np.asarray(data.train.labels)
    poison = run_attack(params, data, progress=False).poison_mask(len(labels))
    out, used = [], []
    for method in methods:
        for order in ORDERS:
            p = with_method(with_order(params, order), method)
            search_dir, clf_dir = stage_dir(p, "search_poisoned"), stage_dir(p, "classifier_poisoned")
            if not ((search_dir / MARKER).is_file() and (clf_dir / MARKER).is_file()):
                continue
            used += [f"search_poisoned/{search_dir.name}", f"classifier_poisoned/{clf_dir.name}"]
            found = load_search(search_dir)
            ranking, scores, scored = found["ranking"], found["scores"], found["scored"]
            tied = kth_place(scores, scored, k)[1]
            negatives = proxy_validation(ranking[scored[ranking]], k)[0][k:]
            logits = np.load(clf_dir / "classifier.npz")["logits"]
            row = {
                "method": method,
                "order": order,
                "w": found["window"],
                f"top-{k} (%)": 100 * top_k_accuracy(ranking, poison, k),
                f"top-{k}, ties at random (%)": 100 * tie_fair_top_k_accuracy(scores, scored, poison, k),
                f"tied at the {k}th place": int(tied.sum()),
                "of them poisons": int((tied & poison).sum()),
                "poisons among the proxy negatives": int(poison[negatives].sum()),
                "classes of the proxy negatives": int(len(np.unique(labels[negatives]))),
            }
            for rule in ("mean", "unanimous"):
                removed = ensemble_removed(logits, rule)
                suffix = "" if rule == "mean" else ", unanimous"
                row[f"recall{suffix} (%)"] = 100 * removed[poison].mean()
                row[f"clean removed{suffix} (%)"] = 100 * removed[~poison].mean()
            out.append(row)
    return pd.DataFrame(out), used


def main(argv: list[str] | None = None) -> None:
    parser = studies.parser(__doc__)
    parser.add_argument("--method", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--run", action="store_true", help="compute what is missing (both orders)")
    args, params = studies.parse(parser, argv)
    if args.run:
        run(params, args.method)
    table, used = rows(params, args.method)
    table = table.round(1)
    if args.publish:
        studies.publish_table(
            table,
            args.publish,
            "05",
            "search_order",
            "The order of the files",
            f"python -m helpers.studies.order --params {studies.shown_path(args.params)} --publish {args.publish}",
            [
                f"- the profile's own order: `cluster.order: {params.cluster.order}`",
                "- every row is read from cached stages (each `stage.json` holds its params and code fingerprint):",
                *(f"  - {s}" for s in used),
            ],
        )
    print(table.to_string())


if __name__ == "__main__":
    main()
