from pathlib import Path

import pytest

from helpers import paths
from helpers.runners import pipeline


def test_every_task_needs_only_known_tasks_and_prepare_comes_first():
    graph = pipeline.tasks()
    names = [t.name for t in graph]
    assert len(names) == len(set(names)) and names[0] == "prepare"
    seen = set()
    for task in graph:  # listed in an order that respects the dependencies
        assert set(task.deps) <= seen, task.name
        seen.add(task.name)
    assert {"ssl_poisoned", "defense_poisoncam_poisoned", "ssl_filtered_patchsearch_icutmix"} <= seen


def test_select_keeps_what_the_chosen_tasks_need():
    chosen = {t.name for t in pipeline.select(pipeline.tasks(), ["eval_filtered_poisoncam"])}
    assert chosen == {
        "prepare",
        "ssl_poisoned",
        "defense_poisoncam_poisoned",
        "ssl_filtered_poisoncam",
        "eval_filtered_poisoncam",
    }
    with pytest.raises(ValueError, match="unknown pipeline task"):
        pipeline.select(pipeline.tasks(), ["ssl_dirty"])


def test_the_longest_chain_starts_first():
    priority = pipeline._priorities(pipeline.tasks())
    # the poisoned model leads to the defenses and the retrainings: it must start before the clean one
    assert priority["ssl_poisoned"] > priority["ssl_clean"] > priority["ssl_clean_icutmix"]
    assert priority["prepare"] == max(priority.values())


def test_a_variant_adds_its_models_and_both_defenses_and_runs_with_its_params(tiny_params, monkeypatch):
    import dataclasses

    from helpers import params as params_mod

    graph = pipeline.tasks(("byol",))
    names = [t.name for t in graph]
    assert len(names) == len(set(names))
    added = {t.name: t.deps for t in graph if t.name.startswith("byol:")}
    assert added["byol:ssl_poisoned"] == ("prepare",)  # the data and the attack are the profile's
    assert added["byol:ssl_filtered_patchsearch_icutmix"] == ("byol:defense_patchsearch_poisoned",)
    assert added["byol:ssl_filtered_poisoncam"] == ("byol:defense_poisoncam_poisoned",)
    assert len(added) == 16  # 7 models, 7 evaluations, 2 defenses
    chosen = {t.name for t in pipeline.select(graph, ["byol:eval_filtered_patchsearch"])}
    assert chosen == {"prepare", "byol:ssl_poisoned", "byol:defense_patchsearch_poisoned",
                      "byol:ssl_filtered_patchsearch", "byol:eval_filtered_patchsearch"}  # fmt: skip

    p = dataclasses.replace(tiny_params, variants={"byol": {"ssl": {"method": "byol", "lr": 0.003}}})
    seen = []
    monkeypatch.setattr("helpers.ssl.train_stage", lambda params, variant, icutmix, progress: seen.append(params))
    pipeline.run_task(p, "byol:ssl_poisoned_icutmix")
    (q,) = seen
    assert (q.ssl.method, q.ssl.lr, q.ssl.icutmix, q.variants) == ("byol", 0.003, False, {})
    with pytest.raises(params_mod.ParamsError, match="unknown variant 'simclr'"):
        pipeline.run_task(p, "simclr:ssl_poisoned")


def test_a_variant_must_be_valid_params():
    from helpers import params as params_mod

    raw = {"profile": "x", "variants": {"byol": {"ssl": {"method": "byol", "lr": 0.003}}}}
    assert params_mod.with_variant(params_mod.from_dict(raw), "byol").ssl.method == "byol"
    with pytest.raises(params_mod.ParamsError, match="variants.byol.*unknown key 'ssl.lrate'"):
        params_mod.from_dict({"profile": "x", "variants": {"byol": {"ssl": {"lrate": 1}}}}, "p.yaml")
    with pytest.raises(params_mod.ParamsError, match="'sll' is not a section"):
        params_mod.from_dict({"profile": "x", "variants": {"byol": {"sll": {"lr": 1}}}}, "p.yaml")


def test_a_finished_evaluation_needs_no_model(tiny_params):
    """The evaluation of a model that is not in the cache but whose result is (a shipped evaluation of an
    unshipped model) is a leaf: the pipeline trains nothing for it, and the evaluation reads its result."""
    import dataclasses

    from helpers import cache, evaluate
    from helpers.params import with_variant

    p = dataclasses.replace(tiny_params, variants={"seed1": {"ssl": {"seed": 1}}})
    graph = pipeline.tasks(("seed1",))
    wanted = ["seed1:eval_clean", "seed1:eval_filtered_patchsearch_icutmix"]
    assert pipeline.finished_evaluations(p, wanted) == frozenset()
    run = with_variant(p, "seed1")
    folder = cache.stage_dir(run, "eval_clean")  # a finished result, as an install leaves it
    folder.mkdir(parents=True)
    (folder / "probe.csv").write_text("labels,seed,clean_acc,asr\n0.1,0,0.5,0.1\n")
    (folder / "knn.json").write_text("{}")
    (folder / cache.MARKER).write_text("{}")
    finished = pipeline.finished_evaluations(p, wanted)
    assert finished == {"seed1:eval_clean"}
    assert {t.name for t in pipeline.select(graph, ["seed1:eval_clean"], finished)} == {"seed1:eval_clean"}
    assert "seed1:ssl_clean" in {t.name for t in pipeline.select(graph, ["seed1:eval_clean"])}
    path, probe, _ = evaluate.evaluate_stage(run, "clean", progress=False)  # no model: read, not trained
    assert path == folder and probe["asr"].tolist() == [0.1]
    assert not cache.stage_dir(run, "ssl_clean").exists()


def _processes_mentioning(text: str) -> list[int]:
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                out.append(int(cmdline.parent.name))
        except OSError:
            continue
    return out


def test_sigterm_stops_every_worker_and_a_rerun_finishes(tiny_params, tmp_path):
    """``kill <pid>`` of a pipeline in the middle of a training: no task process is left running, the
    unfinished stage folder is gone, and the next run resumes and completes the stage."""
    import dataclasses
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    from helpers import cache, io, params

    ssl = dict(arch="resnet10", width=8, epochs=150, batch_size=8, queue_size=16, proj_dim=8, proj_hidden=16)
    p = dataclasses.replace(tiny_params, ssl=dataclasses.replace(tiny_params.ssl, **ssl))
    path = tmp_path / "slow-tiny.yaml"
    path.write_text(params.dump(p))
    cmd = [
        sys.executable,
        "-m",
        "helpers.runners.pipeline",
        "--params",
        str(path),
        "--only",
        "ssl_clean",
        "--workers",
        "1",
    ]
    run = subprocess.Popen(cmd, cwd=paths.REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in run.stderr:
        if "started ssl_clean" in line:
            break
    partial = cache.partial_dir(cache.stage_dir(p, "ssl_clean"))
    deadline = time.time() + 60
    while not (partial / "last.pt").exists() and time.time() < deadline:  # training, epochs checkpointed
        time.sleep(0.2)
    assert (partial / "last.pt").exists() and len(_processes_mentioning(str(path))) == 2  # the run and its task
    run.send_signal(signal.SIGTERM)
    assert run.wait(60) != 0
    assert "stopped: 1 tasks finished (prepare)" in run.stderr.read()
    time.sleep(0.5)
    assert _processes_mentioning(str(path)) == []  # the task went with the run: nothing trains on
    assert not list(cache.stage_dir(p, "ssl_clean").parent.glob(".tmp-*"))
    assert not cache.stage_dir(p, "ssl_clean").exists() and (partial / "last.pt").exists()
    subprocess.run(cmd, cwd=paths.REPO_ROOT, check=True, capture_output=True)
    resumed = io.load_weights(cache.stage_dir(p, "ssl_clean") / "backbone.safetensors")
    env = {**os.environ, "PATCHSEARCH_ARTIFACTS": str(tmp_path / "uninterrupted")}
    subprocess.run(cmd, cwd=paths.REPO_ROOT, check=True, capture_output=True, env=env)
    whole = io.load_weights(
        tmp_path / "uninterrupted" / "ssl_clean" / cache.stage_dir(p, "ssl_clean").name / "backbone.safetensors"
    )
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)  # the same model as a run never stopped


def test_a_failed_task_says_its_cause_in_one_line_and_names_its_log(tiny_params, tmp_path):
    import dataclasses

    from helpers import params

    p = dataclasses.replace(tiny_params, attack=dataclasses.replace(tiny_params.attack, trigger="no/such.png"))
    path = tmp_path / "broken.yaml"
    path.write_text(params.dump(p))
    with pytest.raises(pipeline.PipelineError) as failure:
        pipeline.run_all(path, tmp_path / "logs", workers=1, progress=False, only=["prepare"])
    message = str(failure.value)
    assert "\n" not in message and "no/such.png" in message and str(tmp_path / "logs" / "prepare.log") in message
    assert message.startswith("pipeline task prepare failed: ")
