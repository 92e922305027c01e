"""The renewal's proof (helpers.runners.codelock): what it compares and what it reruns."""

import json

import numpy as np

from helpers.runners import codelock


def _stage(root, name, value, seconds=1.0):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text("a: 1\n")
    np.savez(folder / "scores.npz", scores=np.array([1.0, value]))
    (folder / "summary.json").write_text(json.dumps({"top": value, "seconds": seconds}))


def _pair(tmp_path, changed=None, seconds=1.0):
    before, after = tmp_path / "before", tmp_path / "after"
    for root in (before, after):
        for name in ("attack/k1", "search_poisoned/k2", "ssl_poisoned/k3"):
            _stage(root, name, 2.0 if (root == after and name == changed) else 1.0, seconds if root == after else 1.0)
    return before, after


def test_a_difference_in_any_stage_is_found_not_only_in_the_last(tmp_path):
    assert codelock.compare_artifacts(*_pair(tmp_path / "same")) == []
    for name in ("attack/k1", "search_poisoned/k2", "ssl_poisoned/k3"):  # first, middle and last in order
        found = codelock.compare_artifacts(*_pair(tmp_path / name.replace("/", "_"), changed=name))
        assert found == [f"{name}/scores.npz: differs", f"{name}/summary.json: differs"], name


def test_timings_never_count_but_missing_files_and_stages_do(tmp_path):
    before, after = _pair(tmp_path, seconds=99.0)
    assert codelock.compare_artifacts(before, after) == []
    (after / "attack/k1/summary.json").unlink()
    _stage(after, "eval_poisoned/k4", 1.0)
    found = codelock.compare_artifacts(before, after)
    assert found == ["eval_poisoned/k4: made only by your code", "attack/k1: other files (summary.json)"]


def test_the_proof_reruns_every_task_whose_stages_run_the_module():
    assert codelock.tasks_for(["kd"]) == ["kd_5"]
    assert "prepare" in codelock.tasks_for(["data"]) and len(codelock.tasks_for(["data"])) == len(
        set(codelock.STAGE_TASK.values())
    )
    assert set(codelock.tasks_for(["search"])) >= {"defense_poisoncam_poisoned", "defense_patchsearch_clean"}
