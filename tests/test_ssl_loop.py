import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from helpers import io, paths
from helpers.params import SSLParams
from helpers.ssl import lr_at, train_ssl

PIXELS = torch.randint(0, 256, (48, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def tiny(**changes):
    base = dict(arch="resnet10", width=8, epochs=3, batch_size=16, queue_size=64, proj_dim=8, proj_hidden=16)
    return dataclasses.replace(SSLParams(), **(base | changes))


class Killed(Exception):
    pass


@pytest.mark.parametrize("method, icutmix", [("mocov2", False), ("byol", True)])
def test_killed_run_resumes_to_the_same_weights(tmp_path, method, icutmix):
    p = tiny(method=method, icutmix=icutmix)
    reference, ref_history = train_ssl(PIXELS, p, tmp_path / "uninterrupted", progress=False)

    def kill(epoch, step):
        if (epoch, step) == (1, 1):  # mid-epoch, after the epoch-1 checkpoint
            raise Killed

    with pytest.raises(Killed):
        train_ssl(PIXELS, p, tmp_path / "killed", progress=False, on_step=kill)
    assert io.load_state(tmp_path / "killed" / "last.pt")["epoch"] == 1
    resumed, history = train_ssl(PIXELS, p, tmp_path / "killed", progress=False)
    ref_state, state = reference.state_dict(), resumed.state_dict()
    assert ref_state.keys() == state.keys()
    for key in ref_state:
        assert torch.equal(ref_state[key], state[key]), key
    assert [h["loss"] for h in history] == [h["loss"] for h in ref_history]


def test_a_finished_run_is_not_trained_again(tmp_path):
    p = tiny(epochs=1)
    train_ssl(PIXELS, p, tmp_path, progress=False)
    calls = []
    train_ssl(PIXELS, p, tmp_path, progress=False, on_step=lambda e, s: calls.append((e, s)))
    assert calls == []


def test_batch_larger_than_data_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="ssl.batch_size = 64"):
        train_ssl(PIXELS, tiny(batch_size=64), tmp_path, progress=False)


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)


def test_ddp_with_two_cpu_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(paths.REPO_ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(paths.REPO_ROOT / "tests" / "ddp_worker.py"),
        str(tmp_path),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = (tmp_path / "rank0.txt").read_text().split()
    rank1 = (tmp_path / "rank1.txt").read_text().split()
    assert rank0[2] == rank1[2] == "2" and rank0[1] == "2"
    assert rank0[0] == rank1[0]  # same weights on both ranks: gradients were all-reduced
    assert io.load_state(tmp_path / "ckpt" / "last.pt")["epoch"] == 2


def test_a_diverging_training_stops_names_its_keys_and_is_not_cached(tiny_params):
    from helpers.cache import stage_dir
    from helpers.compute import TrainingDiverged
    from helpers.ssl import train_stage

    p = dataclasses.replace(tiny_params, ssl=tiny(epochs=2, batch_size=4, lr=1e30))
    with pytest.raises(
        TrainingDiverged,
        match=r"stage ssl_clean \(tiny\): mocov2 at epoch 1, step \d+: the loss is nan.*ssl\.lr = 1e\+30",
    ):
        train_stage(p, "clean", progress=False)
    assert not stage_dir(p, "ssl_clean").exists()  # no result served from then on
    assert not list(stage_dir(p, "ssl_clean").parent.glob(".tmp-*"))
