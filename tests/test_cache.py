import dataclasses
import logging

import pytest
import yaml

from helpers import attack, cache, data, params, paths


def replace(p, section, **changes):
    return dataclasses.replace(p, **{section: dataclasses.replace(getattr(p, section), **changes)})


def test_miss_then_hit_with_params_beside(tiny_params, caplog):
    calls = []

    def compute(out, final):
        calls.append(final)
        (out / "result.txt").write_text("42")

    with caplog.at_level(logging.INFO, logger="helpers.cache"):
        first = cache.cached_stage("data", tiny_params, compute)
        second = cache.cached_stage("data", tiny_params, compute)
    assert (first.hit, second.hit) == (False, True) and len(calls) == 1
    assert calls[0] == first.path == paths.artifacts_dir() / "data" / first.key
    assert (first.path / "result.txt").read_text() == "42"
    assert yaml.safe_load((first.path / "params.yaml").read_text()) == params.stage_params(tiny_params, "data")
    assert "cache miss data/" in caplog.text and "cache hit  data/" in caplog.text


def test_failed_compute_leaves_nothing_behind(tiny_params):
    def compute(out, final):
        (out / "half.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache.cached_stage("data", tiny_params, compute)
    stage_root = paths.artifacts_dir() / "data"
    assert list(stage_root.iterdir()) == []
    assert cache.cached_stage("data", tiny_params, lambda out, final: None).hit is False


def test_a_resumable_stage_keeps_its_parts_when_stopped_and_drops_them_once_complete(tiny_params):
    """``resumable_stage``: what a stopped run finished stays in ``<key>.partial/``, the next run starts from
    it, and the folder goes once the stage is in place."""
    seen = []

    def compute(out, final, work):
        seen.append(sorted(p.name for p in work.glob("*")) if work.is_dir() else [])
        work.mkdir(exist_ok=True)
        if not (work / "part_0").exists():
            (work / "part_0").write_text("done")
            raise KeyboardInterrupt  # stopped after its first part
        (out / "result.txt").write_text((work / "part_0").read_text())

    with pytest.raises(KeyboardInterrupt):
        cache.resumable_stage("data", tiny_params, compute)
    work = cache.partial_dir(cache.stage_dir(tiny_params, "data"))
    assert work.name.endswith(".partial") and (work / "part_0").read_text() == "done"
    result = cache.resumable_stage("data", tiny_params, compute)
    assert seen == [[], ["part_0"]] and (result.path / "result.txt").read_text() == "done"
    assert not work.exists() and cache.resumable_stage("data", tiny_params, compute).hit and len(seen) == 2


def test_incomplete_folder_from_a_crash_is_recomputed(tiny_params):
    stale = cache.stage_dir(tiny_params, "data")
    stale.mkdir(parents=True)
    (stale / "partial.npy").write_text("garbage")  # no params.yaml: never completed
    result = cache.cached_stage("data", tiny_params, lambda out, final: (out / "ok").write_text("1"))
    assert result.hit is False and (result.path / "ok").exists() and not (result.path / "partial.npy").exists()


def test_changing_a_parameter_recomputes_exactly_the_stages_that_read_it(tiny_params):
    def run(p):
        d = data.load_data(p, progress=False)
        a = attack.run_attack(p, d, progress=False)
        return d.stage_path, a.path

    data_dir, attack_dir = run(tiny_params)
    # attack change: the data stage is reused, the attack recomputed
    d2, a2 = run(replace(tiny_params, "attack", poison_rate=1.0))
    assert d2 == data_dir and a2 != attack_dir
    # a section no stage reads: both reused
    d3, a3 = run(replace(tiny_params, "figures", dpi=10))
    assert (d3, a3) == (data_dir, attack_dir)
    # data change: both recomputed
    d4, a4 = run(replace(tiny_params, "data", val_per_class=2))
    assert d4 != data_dir and a4 != attack_dir
    assert len(list((paths.artifacts_dir() / "attack").iterdir())) == 3


def _slow_stage(tiny_params, count_file, ready):
    """One of two processes asking for the same stage at once: its compute counts itself and sleeps."""
    import time

    def compute(out, final):
        with open(count_file, "a") as f:
            f.write("computed\n")
        time.sleep(1.0)
        (out / "x.txt").write_text("x")

    ready.wait()
    return cache.cached_stage("data", tiny_params, compute).path


def test_two_runs_at_once_compute_a_stage_once(tiny_params, tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    ready, count_file = ctx.Event(), tmp_path / "count.txt"
    procs = [ctx.Process(target=_slow_stage, args=(tiny_params, count_file, ready)) for _ in range(2)]
    for proc in procs:
        proc.start()
    ready.set()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    assert count_file.read_text().splitlines() == ["computed"]  # the second waited, then found it done
    folder = cache.stage_dir(tiny_params, "data")
    assert (folder / "x.txt").read_text() == "x" and not list(folder.parent.glob(".tmp-*"))


def test_abandoned_temporary_folders_are_removed_and_live_ones_kept(tmp_path):
    import os

    stage = paths.artifacts_dir() / "ssl_clean"
    dead, live = stage / ".tmp-abc-999999999-x", stage / f".tmp-abc-{os.getpid()}-y"
    for folder in (dead, live):
        folder.mkdir(parents=True)
    (removed,) = cache.clean_abandoned()
    assert removed.startswith("ssl_clean/.tmp-abc-999999999-x (") and removed.endswith(" h old)")
    assert not dead.exists() and live.exists()


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path):
    a, b = paths.new_run_dir(tmp_path), paths.new_run_dir(tmp_path)
    assert a != b and a.is_dir() and b.is_dir()
