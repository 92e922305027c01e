"""The study, generality and false-removal runners: what each run is, before anything is trained."""

import dataclasses

import numpy as np
import pytest

from helpers import notebook, params
from helpers.attack import sample_boxes
from helpers.localize import localization_baselines
from helpers.studies import generality, removal, strength


def test_generality_configurations_change_only_the_attack():
    base = params.load(params.paths.PARAMS_DIR / "cifar10.yaml")
    for name, overrides in generality.CONFIGS.items():
        p = generality.config_params(params.paths.PARAMS_DIR / "cifar10.yaml", name)
        for section in ("data", "ssl", "cluster", "search", "classifier", "compute"):
            assert getattr(p, section) == getattr(base, section), (name, section)
        for key, value in overrides.items():
            assert getattr(p.attack, key) == value
    with pytest.raises(ValueError, match="unknown configuration 'nope'"):
        generality.config_params(params.paths.PARAMS_DIR / "cifar10.yaml", "nope")


def test_training_configurations_are_the_profiles_seed_variants():
    """Same params as the profile's variants, so they reuse those models and evaluations: only the SSL
    training differs from the profile."""
    path = params.paths.PARAMS_DIR / "cifar10.yaml"
    base = params.load(path)
    for name, variant in (
        ("ssl-seed1", "ssl_seed1"),
        ("ssl-seed2", "ssl_seed2"),
        ("byol-seed1", "byol_seed1"),
        ("byol-seed2", "byol_seed2"),
    ):
        p = generality.config_params(path, name)
        assert p.ssl == params.with_variant(base, variant).ssl and p.ssl != base.ssl
        for section in ("data", "attack", "cluster", "search", "classifier", "compute"):
            assert getattr(p, section) == getattr(base, section), (name, section)
        assert params.stage_hash(p, "ssl_poisoned") == params.stage_hash(
            params.with_variant(base, variant), "ssl_poisoned"
        )


def test_generality_trigger_pngs_ship_with_the_repository():
    pngs = [c["trigger"] for c in generality.CONFIGS.values() if c.get("trigger", "random") != "random"]
    assert len(pngs) >= 2
    for png in pngs:
        assert params.resolve_input_path(png).is_file(), png


def test_configurations_made_after_the_rules_were_seen_by_no_rule():
    """They judge the blind rules: none was chosen on them, and each tries something the earlier ones did
    not (a target no earlier configuration has, another trigger size or image)."""
    after = generality.CONFIGS_AFTER_RULES
    assert len(after) >= 4
    for rule in ("agreement", "pooled", "natural-negatives"):  # fixed before those were made
        assert not set(generality.CHOSEN_ON[rule]) & set(after), rule
    earlier = [
        c
        for name, c in generality.CONFIGS.items()
        if name not in after | generality.CONFIGS_AFTER_TOWARD | generality.CONFIGS_AFTER_JUDGING
    ]
    targets = {c.get("target_class", "bird") for c in earlier}
    for name, config in after.items():
        new = config.get("target_class") not in targets or any(
            config.get(k) not in {c.get(k) for c in earlier} for k in ("trigger_size", "trigger") if k in config
        )
        assert new, name


def test_configurations_made_after_the_toward_count_judge_it_on_a_new_trigger():
    """Made after ``toward_vs_flat`` was fixed: none was in view when it was written, and each draws a trigger
    (its seed) no earlier configuration drew."""
    after = generality.CONFIGS_AFTER_TOWARD
    assert after and not set(generality.CHOSEN_ON["toward-count"]) & set(after)
    # the cluster vote was fixed on the configurations cached then: these two, not cached, judge it
    assert not {"size-14px", *after} & set(generality.CHOSEN_ON["cluster-vote"])
    base = params.load(params.paths.PARAMS_DIR / "cifar10.yaml").attack.trigger_seed
    earlier_seeds = {c.get("trigger_seed", base) for n, c in generality.CONFIGS.items() if n not in after}
    for name, config in after.items():
        assert config.get("trigger", "random") == "random" and config["trigger_seed"] not in earlier_seeds, name


def test_configurations_made_after_the_judging_were_seen_by_no_rule_and_draw_new_triggers():
    """Made after the toward count and the cluster vote were judged: no rule or variant was chosen on them, and
    each draws a trigger seed no earlier configuration drew."""
    after = generality.CONFIGS_AFTER_JUDGING
    assert len(after) >= 2
    for rule, seen in generality.CHOSEN_ON.items():
        assert not set(seen) & set(after), rule
    base = params.load(params.paths.PARAMS_DIR / "cifar10.yaml").attack.trigger_seed
    earlier_seeds = {c.get("trigger_seed", base) for n, c in generality.CONFIGS.items() if n not in after}
    assert {c["trigger_seed"] for c in after.values()}.isdisjoint(earlier_seeds)


def test_profile_spreads_its_triggers():
    """The profile's training triggers: a fixed window at the centre, of the trigger's side, hits at most a
    third of them (issue 10), measured on boxes drawn exactly as the attack draws them."""
    p = params.load(params.paths.PARAMS_DIR / "cifar10.yaml")
    a = p.attack
    side = round(a.trigger_size * 32)
    boxes = sample_boxes(np.random.default_rng(0), np.tile([32, 32], (2000, 1)), a, a.train_margin, a.n_copies, "m")
    per_trigger = boxes.reshape(-1, 4)[:, :3]
    assert localization_baselines(per_trigger, side, 32)["centre"] <= 1 / 3


def test_study_pairs_share_the_setting_and_differ_in_the_pair():
    runs = [strength.pair_run("spread12x2-bf16-e50", t, s) for t, s in strength.PAIRS]
    assert len(set(runs)) == len(strength.PAIRS) >= 3
    attacks = [strength.RUNS[r]["attack"] for r in runs]
    assert {(a["target_class"], a["trigger_seed"]) for a in attacks} == set(strength.PAIRS)
    assert all(strength.RUNS[r]["ssl"] == strength.SETTINGS["spread12x2-bf16-e50"]["ssl"] for r in runs)


def test_removal_study_variants_touch_only_the_classifier():
    p = params.load(params.paths.PARAMS_DIR / "cifar10.yaml")
    v = removal.variant_params(p, "paper")
    assert v.classifier.paste_scale == [0.3333, 1.3333] and v.search == p.search and v.attack == p.attack
    assert removal.variant_params(p, "paste-2/3") == p  # the profile's own
    n = removal.variant_params(p, "natural-negatives")
    assert n.classifier == dataclasses.replace(p.classifier, negative_paste=0.5) and n.search == p.search
    # the key added later leaves the profile's classifier keys (and its shipped results) as they were
    assert "negative_paste" not in params.stage_params(p, "classifier_poisoned")["classifier"]
    assert params.stage_params(n, "classifier_poisoned")["classifier"]["negative_paste"] == 0.5
    assert params.stage_hash(n, "search_poisoned") == params.stage_hash(p, "search_poisoned")


def test_ensemble_rules_mean_and_unanimous():
    # three members, four images: margins (logit 1 - logit 0) per member
    margins = np.array([[3.0, 1.0, -1.0, -2.0], [3.0, -2.0, 2.0, -2.0], [3.0, 2.0, -2.0, 1.0]])
    logits = np.stack([np.zeros_like(margins), margins], -1)
    assert removal.ensemble_removed(logits, "mean").tolist() == [True, True, False, False]
    assert removal.ensemble_removed(logits, "unanimous").tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="majority"):
        removal.ensemble_removed(logits, "majority")


def test_study_goal_checks_name_each_part():
    met = strength.goal_checks(0.30, 0.05, 0.40, 0.42, 0.8)
    assert all(met.values())
    missed = strength.goal_checks(0.37, 0.091, 0.391, 0.375, 0.877)  # the study's AdamW run: 4.1x, not 5x
    assert [k for k, ok in missed.items() if not ok] == ["ASR >= 5x the clean model's"]


def test_the_gpu_profile_runs_only_what_the_queue_has_shipped():
    from helpers.runners import gpu
    from helpers.runners.reproduce import gpu_refusal

    j1, j2, j3, j4 = gpu.JOBS[:4]  # the models; the stronger attack; both defenses; what comes after them
    assert "defense_patchsearch_poisoned" in j3.phases[0]
    assert "no GPU job has shipped" in gpu_refusal(j1, None)
    assert "no GPU job has shipped" in gpu_refusal(j1, ["01", "02"])
    for before_the_defenses in (j2, j3):
        assert 'ONLY="01 02"' in gpu_refusal(before_the_defenses, None)  # the models alone: defenses take hours
        assert 'ONLY="01 02"' in gpu_refusal(before_the_defenses, ["01", "03"])
        assert gpu_refusal(before_the_defenses, ["01", "02"]) is None and gpu_refusal(j2, ["02"]) is None
    assert gpu_refusal(j4, None) is None and gpu_refusal(None, None) is None


def test_a_kept_rows_commit_is_read_from_either_form_of_the_record(monkeypatch, tmp_path):
    monkeypatch.setattr(generality.paths, "published_dir", lambda profile: tmp_path)
    record = tmp_path / "07_generality_RECORD.md"
    record.write_text(
        "- published at commit `abc1` by `python -m helpers.studies.generality --publish p --run a-1 --run b`\n"
    )
    assert generality.row_commits("p", "generality") == {"a-1": "abc1", "b": "abc1"}
    record.write_text(
        "- published at commit `ccc3` by `... --run b --keep`\n- `a-1`: computed at commit `abc1`\n"
        "- `b`: computed at commit `ccc3`\n"
    )
    assert generality.row_commits("p", "generality") == {"a-1": "abc1", "b": "ccc3"}
    assert generality.row_commits("p", "other") == {}
    record.write_text("- published at commit `ce7a808f-dirty` by `... --run a-1`\n")
    assert generality.row_commits("p", "generality") == {"a-1": "ce7a808f-dirty"}
    assert notebook.short_commit("ce7a808f-dirty") == "ce7a808 (with uncommitted changes)"


def test_a_study_record_names_its_commit_and_is_read_back_by_the_generality_table(monkeypatch, tmp_path):
    from helpers import studies
    from helpers.runners import reproduce

    monkeypatch.setattr(studies.paths, "published_dir", lambda profile: tmp_path / profile)
    monkeypatch.setattr(reproduce, "git_commit", lambda: "feed1")
    command = "python -m helpers.studies.generality --publish p --run b --keep"
    target = studies.write_record(
        "p",
        "07_generality",
        "Generality tables",
        command,
        ["- `a-1`: computed at commit `abc1`", "- `b`: computed at commit `feed1`"],
    )
    assert target == tmp_path / "p" / "07_generality_RECORD.md"
    assert target.read_text().splitlines() == [
        "# Generality tables: record",
        "",
        f"- published at commit `feed1` by `{command}`",
        "- `a-1`: computed at commit `abc1`",
        "- `b`: computed at commit `feed1`",
    ]
    assert generality.row_commits("p", "generality") == {"a-1": "abc1", "b": "feed1"}


def test_a_studys_options_set_the_threads_and_load_the_params(monkeypatch):
    import torch

    from helpers import studies

    before = torch.get_num_threads()
    try:
        parser = studies.parser("doc", threads=1)
        parser.add_argument("--run", action="store_true")
        args, params = studies.parse(parser, ["--params", "params/smoke.yaml", "--run"])
        assert torch.get_num_threads() == 1 and args.run and args.publish is None
        assert params.profile == "smoke"
        with pytest.raises(SystemExit):
            studies.parse(parser, ["--threads", "two"])
    finally:
        torch.set_num_threads(before)


def test_a_flip_set_of_n_per_cluster_takes_the_n_nearest_its_centre_and_one_is_the_profiles():
    from helpers.cluster import flip_set
    from helpers.studies.flip_test import nearest_per_cluster

    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(3, 8))
    assignment = np.repeat([0, 1, 2], [5, 4, 2])
    features = centroids[assignment] + rng.normal(scale=0.5, size=(11, 8))
    assert set(nearest_per_cluster(features, assignment, centroids, 1)) == set(
        flip_set(features, assignment, centroids)
    )
    chosen = nearest_per_cluster(features, assignment, centroids, 3)
    assert len(chosen) == 3 + 3 + 2  # the cluster of two gives both
    cos = (features / np.linalg.norm(features, axis=1, keepdims=True)) @ (
        centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    ).T
    for k in range(3):
        members = np.flatnonzero(assignment == k)
        picked = np.intersect1d(chosen, members)
        rest = np.setdiff1d(members, picked)
        assert not len(rest) or cos[picked, k].min() > cos[rest, k].max()


def test_a_study_publishes_its_table_and_the_record_that_names_commit_and_command():
    import pandas as pd

    from helpers import paths, studies

    csv = studies.publish_table(
        pd.DataFrame({"side": [12, 14], "top-20 (%)": [85.0, 100.0]}), "tiny", "05", "x", "A study", "cmd --a", ["- L"]
    )
    folder = paths.published_dir("tiny")
    assert csv == folder / "05_x.csv" and pd.read_csv(csv)["top-20 (%)"].tolist() == [85.0, 100.0]
    assert "| 14 | 100 |" in (folder / "05_x.md").read_text()
    record = (folder / "05_x_RECORD.md").read_text().splitlines()
    assert record[0] == "# A study: record" and record[-1] == "- L"
    assert "by `cmd --a`" in record[2] and "published at commit `" in record[2]
