"""A search or a poison classifier stopped part way (a GPU job at its deadline) resumes where it stopped and
ends with the result of a run never stopped; the GPU queue brings the finished part back and carries it
to the job's next try."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from helpers import cache, classify, search
from helpers.runners import gpu


class Stop(Exception):
    """Stands for the deadline's SIGTERM."""


@pytest.fixture
def small(tiny_params):
    p = tiny_params
    return dataclasses.replace(
        p,
        ssl=dataclasses.replace(p.ssl, arch="resnet10", width=8, epochs=1, batch_size=8, queue_size=16, proj_hidden=16),
        cluster=dataclasses.replace(p.cluster, k=3),
        search=dataclasses.replace(p.search, window_sweep=[3, 5, 7], window_draws=2, window_top_k=3, save_top=4),
        classifier=dataclasses.replace(p.classifier, top_k=3, n_models=3, width=8, max_iters=6, eval_every=3),
    )


def stop_on_call(monkeypatch, module, name, n):
    """``module.name`` raising ``Stop`` on its ``n``-th call (the calls before it run; 0: never); returns the
    list that counts its calls."""
    real, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Stop
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def same_stage(a, b):
    """Every file of two stage folders equal (arrays, tables, JSON without its timings)."""
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "stage.json")
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "stage.json")
    for name in names:
        if name.suffix == ".npz":
            x, y = np.load(a / name), np.load(b / name)
            assert sorted(x.files) == sorted(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files), name
        elif name.suffix == ".json":
            x, y = (json.loads((f / name).read_text()) for f in (a, b))
            assert {k: v for k, v in x.items() if "seconds" not in k} == {
                k: v for k, v in y.items() if "seconds" not in k
            }, name
        elif name.suffix == ".csv":
            pd.testing.assert_frame_equal(pd.read_csv(a / name), pd.read_csv(b / name))
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("method", ["patchsearch", "poisoncam"])
def test_a_stopped_search_resumes_after_its_last_side_with_the_same_result(small, method, tmp_path, monkeypatch):
    p = search.with_method(small, method)
    real_search, real_agreement = search.iterative_search, search.Scorer.agreement
    whole = search.search_stage(p, progress=False)  # the run never stopped (its models and clusters shared)
    done = tmp_path / "whole"
    whole.rename(done)
    calls = stop_on_call(monkeypatch, search, "iterative_search", 3)  # stopped in the third side's search
    with pytest.raises(Stop):
        search.search_stage(p, progress=False)
    work = cache.partial_dir(cache.stage_dir(p, "search_poisoned"))
    assert not cache.stage_dir(p, "search_poisoned").exists()
    assert sorted(f.name for f in work.glob("window_*.npz")) == ["window_3.npz", "window_5.npz"]
    calls.clear()
    monkeypatch.setattr(search.Scorer, "agreement", _stop)  # the sweep ends, then the agreements stop it
    with pytest.raises(Stop):
        search.search_stage(p, progress=False)
    assert len(calls) == 1 and not (work / "agreement.json").exists()  # only the third side searched
    monkeypatch.setattr(search, "iterative_search", real_search)  # (not undo(): it would undo the fixture's too)
    monkeypatch.setattr(search.Scorer, "agreement", real_agreement)
    stop_on_call(monkeypatch, search.Scorer, "agreement", 2)  # one side's agreement kept, then stopped
    with pytest.raises(Stop):
        search.search_stage(p, progress=False)
    assert list(json.loads((work / "agreement.json").read_text())) == ["3"]
    monkeypatch.setattr(search.Scorer, "agreement", real_agreement)
    resumed = search.search_stage(p, progress=False)
    same_stage(resumed, done)
    assert not work.exists()  # the finished part goes once the stage is complete


def _stop(*args, **kwargs):
    raise Stop


def test_a_stopped_classifier_ensemble_resumes_with_the_same_members(small, tmp_path, monkeypatch):
    real = classify.train_classifier
    whole = classify.classifier_stage(small, progress=False)
    done = tmp_path / "whole"
    whole.rename(done)
    calls = stop_on_call(monkeypatch, classify, "train_classifier", 2)
    with pytest.raises(Stop):
        classify.classifier_stage(small, progress=False)
    work = cache.partial_dir(cache.stage_dir(small, "classifier_poisoned"))
    assert [f.name for f in work.iterdir()] == ["member_0.npz"]
    monkeypatch.setattr(classify, "train_classifier", real)
    calls = stop_on_call(monkeypatch, classify, "train_classifier", 0)  # counted, never stopped
    resumed = classify.classifier_stage(small, progress=False)
    assert len(calls) == 2  # members 1 and 2 only
    same_stage(resumed, done)
    assert not work.exists()


def test_the_queue_brings_a_stopped_part_back_and_carries_it_to_the_next_try(tmp_path, monkeypatch):
    artifacts = tmp_path / "device" / "artifacts"
    for stage, key, finished in (
        ("search_poisoned", "aaa", False),
        ("classifier_poisoned", "bbb", False),
        ("search_poisoned", "ccc", True),  # finished between its last window and the clean-up: not a part
        ("ssl_poisoned", "ddd", False),  # a training's checkpoints never come back
    ):
        (artifacts / stage / f"{key}.partial").mkdir(parents=True)
        (artifacts / stage / f"{key}.partial" / "window_3.npz").write_bytes(key.encode())
        if finished:
            (artifacts / stage / key).mkdir()
            (artifacts / stage / key / "params.yaml").write_text("x")
    bundle = tmp_path / "bundle" / gpu.PARTIAL
    assert gpu.pack_partial(artifacts, bundle) == ["classifier_poisoned/bbb", "search_poisoned/aaa"]
    shipped = tmp_path / "figures" / "checkpoints"
    monkeypatch.setattr(gpu, "shipped_dir", lambda profile: shipped)
    gpu.keep_partial(bundle, shipped / gpu.PARTIAL, entries=[])
    staging = tmp_path / "staging"
    record = {"partial": ["classifier_poisoned/bbb", "search_poisoned/aaa"]}
    assert gpu.carry_partial("p", record, staging) == record["partial"]
    assert (staging / gpu.PARTIAL / "search_poisoned" / "aaa" / "window_3.npz").read_bytes() == b"aaa"
    # the next try finishes the search: its part goes, the classifier's stays
    gpu.keep_partial(tmp_path / "nothing", shipped / gpu.PARTIAL, entries=[{"stage": "search_poisoned", "key": "aaa"}])
    assert [p.name for p in (shipped / gpu.PARTIAL).iterdir()] == ["classifier_poisoned"]
    gpu.keep_partial(tmp_path / "nothing", shipped / gpu.PARTIAL, [{"stage": "classifier_poisoned", "key": "bbb"}])
    assert not (shipped / gpu.PARTIAL).exists()
