"""Checkpoints hold weights, numbers and JSON, never pickled objects: loading runs no code."""

import dataclasses
import json

import pytest
import torch

from helpers import io
from helpers.params import SSLParams
from helpers.ssl import load_backbone, train_ssl


class Payload:
    """An arbitrary object: unpickling it could run any code, so it must never be loaded."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickled_object_in_a_checkpoint_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 1, "extra": Payload()}, path)
    with pytest.raises(io.CheckpointError, match=r"last\.pt: refused to load: it is not a weights-only checkpoint"):
        io.load_state(path)


def test_a_resumable_state_round_trips_without_pickle(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "epoch": 2}
    io.save_state(tmp_path / "s.pt", state)
    loaded = io.load_state(tmp_path / "s.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epoch"] == 2


def test_training_writes_weights_only_state_and_json_history(tmp_path):
    p = dataclasses.replace(
        SSLParams(), arch="resnet10", width=8, epochs=2, batch_size=16, queue_size=64, proj_dim=8, proj_hidden=16
    )
    pixels = torch.randint(0, 256, (32, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    train_ssl(pixels, p, tmp_path, progress=False)
    assert io.load_state(tmp_path / "last.pt")["epoch"] == 2
    history = json.loads((tmp_path / "last.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]


def test_a_backbone_file_that_is_not_safetensors_is_refused(tiny_params, tmp_path):
    (tmp_path / "backbone.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(io.CheckpointError, match=r"backbone\.safetensors: not a readable safetensors file"):
        load_backbone(tiny_params, tmp_path, 16)
