"""Does the defense hold beyond one attack? Run the whole pipeline over a list of attack configurations.

    python -m helpers.studies.generality --run NAME [--run NAME ...] [--retrain]   # compute (cached stages)
    python -m helpers.studies.generality --publish cifar10 [--run NAME ...]         # one table in figures/cifar10/
    python -m helpers.studies.generality --publish cifar10 --run NAME --keep        # its row added or replaced
    python -m helpers.studies.generality --list

Every configuration is the base profile (``--base``, default ``params/cifar10.yaml``) with the attack
overrides in ``CONFIGS``: other target classes, trigger seeds, a trigger image that is not an HTBA colour
grid, other trigger sizes, repeated patches. The defenses run exactly as the profile says: nothing in
them reads the attack, so a configuration changes what they are given, never how they are set. Each
configuration is computed by the pipeline's own tasks (``helpers.runners.pipeline``: SSL models, evaluation, both
defenses on the poisoned and the clean set, and with ``--retrain`` the models retrained on the filtered
lists), its params written beside the table.

The published row of a configuration, all measured on its own run:
- backdoor present: 10%-label probe ASR at least 20% and at least 4x the clean model's ASR (the clean model
  is shared by every configuration: its key does not read the attack; its ASR is measured with each
  configuration's trigger);
- per defense: the blind window w, top-20 accuracy (chance: the poison rate), recall, clean images
  removed (% of the clean training images), how often the candidate window hits the trigger beside a
  centre window and a random window of the same side, clean images removed from the clean set (paper
  Table 10), the same removals where the ensemble must be unanimous (``helpers.studies.removal.ENSEMBLES``;
  the pipeline's filtered list follows the paper's mean), and with ``--retrain`` the ASR of the model
  retrained on the filtered list.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
import pandas as pd

from .. import evaluate, io, paths, studies
from .. import params as params_mod
from ..classify import ensemble_removed
from ..notebook import row_commits

# name -> overrides of the base profile's attack section. "default" is the profile itself. None of these is
# a configuration the defaults were chosen on except "default" (the study chose the setting on the pairs
# of ``helpers.studies.strength.PAIRS``, which are the first three rows).
CONFIGS: dict[str, dict] = {
    "default": {},
    "automobile-21": {"target_class": "automobile", "trigger_seed": 21},
    "frog-33": {"target_class": "frog", "trigger_seed": 33},
    "ship-44": {"target_class": "ship", "trigger_seed": 44},
    "x-on-red-png": {"trigger": "params/triggers/x_on_red.png", "target_class": "dog"},
    "size-8px": {"trigger_size": 0.25, "target_class": "horse", "trigger_seed": 55},
    "size-10px": {"trigger_size": 0.3125, "target_class": "deer", "trigger_seed": 66},
    "copies-3": {"n_copies": 3, "target_class": "cat", "trigger_seed": 77},
}
# Made after the pooled window rule and PoisonCAM's count were fixed, before any of them was run: they judge
# both blind (targets no configuration above uses, a trigger size and a PNG trigger no rule was chosen on).
CONFIGS_AFTER_RULES: dict[str, dict] = {
    "airplane-88": {"target_class": "airplane", "trigger_seed": 88},
    "truck-99": {"target_class": "truck", "trigger_seed": 99},
    "size-14px": {"trigger_size": 0.4375, "target_class": "horse", "trigger_seed": 111},
    "checker-png": {"trigger": "params/triggers/checker_blue_yellow.png", "target_class": "ship"},
}
CONFIGS |= CONFIGS_AFTER_RULES
# Made after PatchSearch's ``toward_vs_flat`` count was fixed (f6eabeb), before anything was run on them: they
# judge it (removal variant ``toward-count``) and the profile's defenses: a trigger seed no earlier
# configuration has, and 14 px (the side of size-14px, which planted a backdoor) on a target only tried at 12 px.
CONFIGS_AFTER_TOWARD: dict[str, dict] = {
    "cat-14px": {"trigger_size": 0.4375, "target_class": "cat", "trigger_seed": 141},
}
CONFIGS |= CONFIGS_AFTER_TOWARD
# Made after the toward count and the cluster vote were judged on size-14px and cat-14px (b319705), before
# anything was run on them: two more blind judges of every rule above (the pooled window, PoisonCAM's count,
# the toward count, the cluster vote), each with a trigger seed no earlier configuration drew, at the side
# (14 px) that planted a backdoor on horse, on a target tried before only with a PNG (dog) or at 12 px
# (automobile, planted there).
CONFIGS_AFTER_JUDGING: dict[str, dict] = {
    "dog-14px": {"trigger_size": 0.4375, "target_class": "dog", "trigger_seed": 161},
    "automobile-14px": {"trigger_size": 0.4375, "target_class": "automobile", "trigger_seed": 171},
}
CONFIGS |= CONFIGS_AFTER_JUDGING

# name -> overrides of other sections: the same attack, another SSL training. Made after the pooled window
# rule was fixed (issue 22): they judge it blind (``python -m helpers.studies.generality --table generality_seeds``).
TRAINING_CONFIGS: dict[str, dict] = {
    "ssl-seed1": {"ssl": {"seed": 1}},
    "ssl-seed2": {"ssl": {"seed": 2}},
    "byol-seed1": {"ssl": {"method": "byol", "momentum": 0.996, "seed": 1}},
    "byol-seed2": {"ssl": {"method": "byol", "momentum": 0.996, "seed": 2}},
}
ALL_CONFIGS = {**CONFIGS, **TRAINING_CONFIGS}

TASKS = (  # the pipeline tasks of one configuration
    "eval_clean",
    "eval_poisoned",
    "defense_patchsearch_poisoned",
    "defense_poisoncam_poisoned",
    "defense_patchsearch_clean",
    "defense_poisoncam_clean",
)
RETRAIN_TASKS = ("eval_filtered_patchsearch", "eval_filtered_poisoncam")
METHODS = {"patchsearch": "PatchSearch", "poisoncam": "PoisonCAM"}
# Another poison classifier on a method's own search (``helpers.studies.removal.VARIANTS``), read beside the
# profile's where its stage is cached (``python -m helpers.studies.removal --params <configuration's params>
# --run --variant NAME --data poisoned``): label -> (method, variant).
CLASSIFIER_VARIANTS = {
    "PatchSearch, natural negatives": ("patchsearch", "natural-negatives"),
    "PatchSearch, top clusters excluded": ("patchsearch", "exclude-top-clusters"),
    "PatchSearch, toward count": ("patchsearch", "toward-count"),
}


def config_params(base: Path, name: str) -> params_mod.Params:
    if name not in ALL_CONFIGS:
        raise ValueError(f"unknown configuration {name!r} (known: {', '.join(ALL_CONFIGS)})")
    if name in TRAINING_CONFIGS:
        return params_mod.with_overrides(params_mod.load(base), TRAINING_CONFIGS[name], f"configuration {name!r}")
    raw = params_mod.load(base).to_dict()
    raw["attack"] = {**raw["attack"], **CONFIGS[name]}
    return params_mod.from_dict(raw, f"{base} + generality configuration {name!r}")


def params_path(name: str) -> Path:
    return paths.artifacts_dir() / "generality" / f"{name}.yaml"


def run(
    names: list[str],
    base: Path,
    retrain: bool,
    workers: int | None,
    threads: int | None,
    methods: list[str],
    clean_defense: bool = True,
) -> None:
    from ..runners.pipeline import run_all

    for name in names:
        path = params_path(name)
        io.write_text(path, params_mod.dump(config_params(base, name)))
        only = [t for t in (*TASKS, *(RETRAIN_TASKS if retrain else ())) if not _other_method(t, methods)]
        if not clean_defense:  # shared by every configuration: another run may be computing it
            only = [t for t in only if not t.endswith("_clean") or t.startswith("eval_")]
        log_dir = paths.runs_dir() / "generality" / name
        print(f"== {name}: {ALL_CONFIGS[name] or 'the profile'}", flush=True)
        run_all(path, log_dir, workers, threads, True, only)


def _other_method(task: str, methods: list[str]) -> bool:
    return any(m in task for m in METHODS if m not in methods)


def _cached(params: params_mod.Params, stage: str) -> Path | None:
    from ..cache import MARKER, stage_dir

    folder = stage_dir(params, stage)
    return folder if (folder / MARKER).is_file() else None


@functools.lru_cache(maxsize=16)
def _ground_truth(name: str, base: Path) -> tuple[params_mod.Params, object, np.ndarray, int]:
    """A configuration's params, attack, poison mask and image size, loaded once for all its tables."""
    from ..attack import run_attack
    from ..data import load_data

    params = params_mod.with_resolved_root(config_params(base, name))
    data = load_data(params, progress=False)
    attack = run_attack(params, data, progress=False)
    return params, attack, attack.poison_mask(len(data.train.images)), int(data.train.pixels.shape[-1])


def config_row(name: str, base: Path) -> dict:
    """The published row of one configuration (every stage must be cached: ``--run`` it first)."""
    from ..classify import detection_metrics
    from ..evaluate import evaluate_stage
    from ..search import load_search, with_method
    from . import removal

    params, attack, poison, size = _ground_truth(name, base)

    def probe_asr(variant: str, **kw) -> float:
        _, probe, _ = evaluate_stage(params, variant, progress=False, **kw)
        return float(probe[np.isclose(probe["labels"], 0.1)]["asr"].mean())

    asr, asr_clean = probe_asr("poisoned"), probe_asr("clean")
    row = {
        "configuration": name,
        "attack": str(ALL_CONFIGS[name] or "profile"),
        "target": attack.target_class,
        "trigger px": int(attack.poison_boxes[0, 0, 2]),
        "copies": int(attack.poison_boxes.shape[1]),
        "probe ASR (%)": 100 * asr,
        "clean model ASR (%)": 100 * asr_clean,
        "backdoor present": evaluate.backdoor_planted(asr, asr_clean),
        "cluster vote held out": name not in CHOSEN_ON["cluster-vote"],
    }
    defenses = [(label, with_method(params, method), None) for method, label in METHODS.items()]
    defenses += [
        (label, removal.variant_params(with_method(params, method), variant), variant)
        for label, (method, variant) in CLASSIFIER_VARIANTS.items()
    ]
    for label, pm, variant in defenses:
        search_dir, clf_dir = _cached(pm, "search_poisoned"), _cached(pm, "classifier_poisoned")
        if search_dir is None or clf_dir is None:  # this method was not run on this configuration
            continue
        found = load_search(search_dir)
        logits = np.load(clf_dir / "classifier.npz")["logits"]
        boxes = attack.boxes_of(np.flatnonzero(found["scored"] & poison))
        m = detection_metrics(found, ensemble_removed(logits, "mean"), poison, boxes, size)
        unanimous = ensemble_removed(logits, "unanimous")
        voted = _voted(pm, "poisoned", ensemble_removed(logits, "mean"))
        clean_dir = _cached(pm, "classifier_clean")
        clean_logits = np.load(clean_dir / "classifier.npz")["logits"] if clean_dir else None
        row |= {
            f"{label} w": m["w"],
            f"{label} top-20 (%)": m["top-20 acc (%)"],
            f"{label} recall (%)": m["recall (%)"],
            f"{label} clean removed (%)": m["clean removed (%)"],
            f"{label} trigger hit (%)": m["trigger hit, scored poisons (%)"],
            f"{label} centre hit (%)": m["centre window hit (%)"],
            f"{label} random hit (%)": m["random window hit (%)"],
            f"{label} clean set removed (%)": _removed_pct(clean_logits, "mean"),
            f"{label} recall, unanimous (%)": 100 * unanimous[poison].mean(),
            f"{label} clean removed, unanimous (%)": 100 * unanimous[~poison].mean(),
            f"{label} clean set removed, unanimous (%)": _removed_pct(clean_logits, "unanimous"),
            f"{label} recall, cluster vote (%)": 100 * voted[poison].mean() if voted is not None else float("nan"),
            f"{label} clean removed, cluster vote (%)": (
                100 * voted[~poison].mean() if voted is not None else float("nan")
            ),
            f"{label} clean set removed, cluster vote (%)": _vote_pct(
                pm, None if clean_logits is None else ensemble_removed(clean_logits, "mean")
            ),
        }
        row[f"{label} defended ASR (%)"] = 100 * filtered_probe_asr(pm)  # nan where not retrained
        if variant is not None:  # was this configuration in view when the variant was chosen?
            row[f"{label} held out"] = name not in CHOSEN_ON[variant]
    return row


def _voted(params: params_mod.Params, data: str, removed: np.ndarray) -> np.ndarray | None:
    """``classify.cluster_vote`` of ``removed`` over the clusters the search of ``data`` ran on (computed from
    the cached model where the clustering itself is not cached: seconds; None where the model is not cached)."""
    from ..classify import cluster_vote
    from ..cluster import cluster_stage

    if _cached(params, f"ssl_{data}") is None:
        return None
    folder = cluster_stage(params, data, progress=False)
    return cluster_vote(removed, np.load(folder / "clustering.npz")["assignment"])


def _vote_pct(params: params_mod.Params, removed: np.ndarray | None) -> float:
    """% of the clean set removed under the cluster vote (nan where the clean set's stages are not cached)."""
    voted = None if removed is None else _voted(params, "clean", removed)
    return float("nan") if voted is None else 100 * voted.mean()


def _removed_pct(logits: np.ndarray | None, rule: str) -> float:
    return float("nan") if logits is None else 100 * ensemble_removed(logits, rule).mean()


def filtered_probe_asr(params: params_mod.Params) -> float:
    """10%-label probe ASR of the model retrained on the filtered list where its evaluation is cached, else nan."""
    path = _cached(params, "eval_filtered")
    if path is None:
        return float("nan")
    probe = pd.read_csv(path / "probe.csv")
    return float(probe[np.isclose(probe["labels"], 0.1)]["asr"].mean())


# The configurations each blind rule was chosen after seeing (its top-20 per side, ground truth): on the rest
# it is held out. The paper's RSD and the contrast statistic were not chosen on any of these. A classifier
# variant: the configurations whose removals (ground truth) were seen before it was kept.
CHOSEN_ON = {
    "agreement": ("default", "automobile-21", "frog-33"),
    "pooled": ("default", "automobile-21", "frog-33", "ship-44", "size-8px", "size-10px"),
    "natural-negatives": ("default", "automobile-21"),
    # the idea came from the poisons left in the pool, counted on the seven configurations run then (issue 22);
    # removals by threshold were looked at on these three; no removal of the variant itself was seen
    "exclude-top-clusters": ("default", "automobile-21", "size-14px"),
    # written after recounting one side of automobile-21's search from its flip destinations
    # (helpers.studies.flip_test's SEEN)
    "toward-count": ("automobile-21",),
    # classify.cluster_vote, fixed after computing it from the cached removals of every configuration cached
    # then (its recall and clean removals with both ensembles); size-14px and cat-14px were not cached
    "cluster-vote": ("default", "automobile-21", "x-on-red-png", "size-8px", "size-10px"),
}


def window_sweep_rows(name: str, base: Path) -> list[dict]:
    """Every window side of one configuration's searches: every blind rule's statistic and pick, and the
    top-20 accuracy each side reaches (ground truth), to hold the blind pick against the best side."""
    from ..cluster import defense_ids, training_set
    from ..search import WINDOW_RULES, SearchResult, load_search, top_k_accuracy, with_method

    params, attack, poison, _ = _ground_truth(name, base)
    ids = defense_ids(params, training_set(params, "poisoned")[0])  # the search's tie order
    out = []
    for method, label in METHODS.items():
        search_dir = _cached(with_method(params, method), "search_poisoned")
        if search_dir is None:
            continue
        found = load_search(search_dir)
        for _, r in found["sweep"].iterrows():
            w = int(r["window"])
            ranking = SearchResult(found[f"scores_w{w}"], found[f"scored_w{w}"], ids=ids).ranking()
            out.append(
                {
                    "configuration": name,
                    "trigger px": int(attack.poison_boxes[0, 0, 2]),
                    "method": label,
                    "window": w,
                    "top-20 (%)": 100 * top_k_accuracy(ranking, poison, 20),
                    **{rule: r[rule] for rule in WINDOW_RULES},
                    "pooled sd": r["pooled_sd"],
                    **{f"{rule} pick": bool(r[f"{rule}_pick"]) for rule in WINDOW_RULES},
                }
            )
    return out


def publish(
    profile: str, names: list[str], base: Path, table_name: str = "generality", keep: bool = False
) -> pd.DataFrame:
    """Write the table of ``names`` (every stage cached) into ``figures/<profile>/``. ``keep``: also keep the
    published rows of the other configurations as they are (each with the commit it was computed at, in
    the record), for a checkout whose cache holds only the configurations just run."""
    from ..plotting import save_table
    from ..runners.reproduce import git_commit
    from ..search import WINDOW_RULES

    table = pd.DataFrame([config_row(name, base) for name in names]).round(1)
    sweep = pd.DataFrame([row for name in names for row in window_sweep_rows(name, base)]).round(3)
    commits = dict.fromkeys(names, git_commit())
    if keep:
        folder = paths.published_dir(profile)
        old_table, old_sweep = (pd.read_csv(folder / f"07_{table_name}{end}.csv") for end in ("", "_window_sweep"))
        kept = [name for name in old_table["configuration"] if name not in names]
        commits = {name: commit for name, commit in row_commits(profile, table_name).items() if name in kept}
        if missing := [name for name in kept if name not in commits]:
            raise ValueError(f"07_{table_name}_RECORD.md: no commit for the published rows {missing}")
        commits |= dict.fromkeys(names, git_commit())
        table = pd.concat([old_table[old_table["configuration"].isin(kept)], table], ignore_index=True)
        sweep = pd.concat([old_sweep[old_sweep["configuration"].isin(kept)], sweep], ignore_index=True)
        names = kept + names
        order = {name: i for i, name in enumerate(ALL_CONFIGS)}  # rows in the order the configurations were made
        table, sweep = (
            t.sort_values("configuration", key=lambda c: c.map(order), kind="stable", ignore_index=True)
            for t in (table, sweep)
        )
    save_table(table, profile, "07", table_name, published=True)
    save_table(sweep, profile, "07", f"{table_name}_window_sweep", published=True)
    picks = []
    for (name, label), t in sweep.groupby(["configuration", "method"], sort=False):
        best = t["top-20 (%)"].max()
        row = {"configuration": name, "trigger px": int(t["trigger px"].iloc[0]), "method": label}
        row |= {"best w": int(t.loc[t["top-20 (%)"].idxmax(), "window"]), "best top-20 (%)": best}
        for rule in WINDOW_RULES:
            pick = t[t[f"{rule} pick"]].iloc[0]
            row |= {
                f"{rule} w": int(pick["window"]),
                f"{rule} top-20 (%)": pick["top-20 (%)"],
                f"{rule} within 5 points": bool(best - pick["top-20 (%)"] <= 5),
            }
            if rule in CHOSEN_ON:
                row[f"{rule} held out"] = name not in CHOSEN_ON[rule]
        picks.append(row)
    save_table(pd.DataFrame(picks).round(1), profile, "07", f"{table_name}_blind_window", published=True)
    for stale in paths.published_dir(profile).glob(f"07_{table_name}_params_*.yaml"):  # a row no longer published
        if stale.stem.removeprefix(f"07_{table_name}_params_") not in names:
            stale.unlink()
    for name in names:  # the params of every configuration, beside the table
        target = paths.published_dir(profile) / f"07_{table_name}_params_{name}.yaml"
        io.write_text(target, params_mod.dump(config_params(base, name)))  # the params the row was read with
    computed = [name for name in names if commits[name] == git_commit()]
    studies.write_record(
        profile,
        f"07_{table_name}",
        "Generality tables",
        f"python -m helpers.studies.generality --publish {profile}"
        + (f" --table {table_name}" if table_name != "generality" else "")
        + "".join(f" --run {name}" for name in computed)
        + (" --keep" if keep else ""),
        [
            *(f"- `{name}`: computed at commit `{commits[name]}`" for name in names),
            "- every number is read from the cached stages of each configuration (`07_generality_params_*.yaml`);",
            "  each stage's `stage.json` holds its key material (params, code fingerprint) and compute seconds",
        ],
    )
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], choices=sorted(ALL_CONFIGS))
    parser.add_argument("--table", default="generality", help="published as 07_TABLE*.md (e.g. generality_seeds)")
    parser.add_argument("--base", default=str(paths.PARAMS_DIR / "cifar10.yaml"))
    parser.add_argument("--retrain", action="store_true", help="also retrain on the filtered lists (defended ASR)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--publish", metavar="PROFILE", help="write the table to figures/PROFILE/")
    parser.add_argument("--keep", action="store_true", help="publish: keep the other published rows as they are")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--no-clean-defense", action="store_true", help="skip the defense on the clean set")
    args = parser.parse_args(argv)
    names = args.run or list(CONFIGS)
    if args.list:
        for name, overrides in ALL_CONFIGS.items():
            print(f"{name}: {overrides or 'the profile'}")
        return
    if args.publish:
        print(publish(args.publish, names, Path(args.base), args.table, args.keep).to_string())
        return
    run(names, Path(args.base), args.retrain, args.workers, args.threads, args.methods, not args.no_clean_defense)


if __name__ == "__main__":
    main()
