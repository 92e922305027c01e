"""Shipped checkpoints: ship, verify, install, refuse; the retrain switch; the shipped set against this code."""

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import cache, compute, io, paths
from helpers.io import CheckpointError
from helpers.params import load, with_resolved_root
from helpers.runners import checkpoints

SHARED_CIFAR10 = paths.DEFAULT_DATA_ROOTS["cifar10"][0]


@pytest.fixture
def tiny_params(tiny_params):
    """The tiny profile with a narrow ResNet-18 (width 8): its backbone files weigh 0.7 MB, not 44."""
    return dataclasses.replace(tiny_params, ssl=dataclasses.replace(tiny_params.ssl, width=8))


def make_stage(params, stage="ssl_poisoned"):
    """A cached stage like a trained model's: weights, a file list naming data and artifacts, left-out features."""
    from helpers.models import backbone_for

    weights = backbone_for(params.ssl, 32).state_dict()

    def compute(out, final):
        io.save_weights(out / "backbone.safetensors", weights, {"precision": "bf16"})
        image = Path(params.data.root) / "train" / "dog" / "000.png"
        poisoned = final.parent.parent / "attack" / "k" / "dog" / "001.png"
        (out / "filtered.txt").write_text(f"{image} 1\n{poisoned} 1\n")
        np.savez(out / "features.npz", x=np.zeros(3))

    return cache.cached_stage(stage, params, compute), weights


def write_record(params, used, commit="0123456789abcdef"):
    record = {"commit": commit, "finished_utc": "now", "params": params.to_dict(), "stages_used": used}
    return io.write_json(paths.runs_dir() / "record.json", record)


@pytest.fixture
def shipped(tiny_params):
    """A model retrained on a filtered list (shipped in fp16) and the backdoored model (run live: exact)."""
    result, weights = make_stage(tiny_params, "ssl_filtered")
    exact, _ = make_stage(tiny_params, "ssl_poisoned")
    used = [f"data/{'0' * 16}", f"ssl_filtered/{result.key}", f"ssl_poisoned/{exact.key}"]
    manifest = checkpoints.ship(write_record(tiny_params, used))
    shutil.rmtree(paths.artifacts_dir())  # a fresh clone: nothing cached
    return manifest, result, weights


def test_ship_then_install_restores_the_stage_in_half_precision(tiny_params, shipped):
    manifest, result, weights = shipped
    entry, exact = manifest["stages"]  # only the expensive kinds are shipped: not data/
    assert (entry["stage"], entry["key"], entry["commit"]) == ("ssl_filtered", result.key, "0123456789abcdef")
    assert entry["left_out"] == ["features.npz"] and entry["half_precision"] == ["backbone.safetensors"]
    assert exact["stage"] == "ssl_poisoned" and exact["half_precision"] == []
    source = checkpoints.shipped_dir("tiny") / "ssl_filtered" / result.key
    assert "@DATA_ROOT@/train/dog/000.png 1" in (source / "filtered.txt").read_text()  # no machine's paths
    assert io.load_weights(source / "backbone.safetensors")["stem.0.weight"].dtype == torch.float16

    report = checkpoints.install(tiny_params)
    assert report.installed == [f"ssl_filtered/{result.key}", f"ssl_poisoned/{exact['key']}"] and not report.refused
    installed = paths.artifacts_dir() / "ssl_filtered" / result.key
    lines = (installed / "filtered.txt").read_text().splitlines()
    assert lines[0] == f"{tiny_params.data.root}/train/dog/000.png 1"
    assert lines[1].startswith(f"{paths.artifacts_dir()}/attack/k/")
    loaded = io.load_weights(installed / "backbone.safetensors")
    assert torch.allclose(loaded["stem.0.weight"].float(), weights["stem.0.weight"], atol=2e-3)
    assert loaded["stem.1.num_batches_tracked"].dtype == torch.int64  # only floating tensors are halved
    assert not (installed / "features.npz").exists()
    assert json.loads((installed / "stage.json").read_text())["shipped"]["commit"] == "0123456789abcdef"
    # the cache now hits it, and a second install leaves it alone
    assert cache.cached_stage("ssl_filtered", tiny_params, lambda out, final: pytest.fail("recomputed")).hit
    assert len(checkpoints.install(tiny_params).present) == 2


def test_a_changed_file_is_refused_naming_it_and_nothing_is_installed(tiny_params, shipped):
    _, result, _ = shipped
    path = checkpoints.shipped_dir("tiny") / "ssl_filtered" / result.key / "backbone.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"backbone\.safetensors: sha256 .* is not the manifest's"):
        checkpoints.install(tiny_params)
    stage_root = paths.artifacts_dir() / "ssl_filtered"
    assert not stage_root.exists() or list(stage_root.iterdir()) == []


def test_a_missing_or_unlisted_file_is_refused(tiny_params, shipped):
    _, result, _ = shipped
    source = checkpoints.shipped_dir("tiny") / "ssl_filtered" / result.key
    (source / "extra.npy").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="extra.npy"):
        checkpoints.install(tiny_params)
    (source / "extra.npy").unlink()
    (source / "history.json").unlink(missing_ok=True)
    (source / "filtered.txt").unlink()
    with pytest.raises(CheckpointError, match="filtered.txt: missing"):
        checkpoints.install(tiny_params)


def test_other_params_or_data_refuse_the_checkpoint_with_the_reason(tiny_params, shipped, tmp_path):
    _, result, _ = shipped
    other = dataclasses.replace(tiny_params, ssl=dataclasses.replace(tiny_params.ssl, epochs=3))
    report = checkpoints.install(other)
    assert list(report.refused.values()) == [[f"ssl.epochs: {tiny_params.ssl.epochs!r} shipped, 3 here"]] * 2
    assert not report.installed and not paths.artifacts_dir().exists()
    assert "refused ssl_filtered/" in report.summary() and "will be computed" in report.summary()

    copy = tmp_path / "copy"
    shutil.copytree(tiny_params.data.root, copy)
    (copy / "train" / "dog" / "000.png").write_bytes(b"not the same image")
    elsewhere = dataclasses.replace(tiny_params, data=dataclasses.replace(tiny_params.data, root=str(copy)))
    (copy / "test" / "cat" / "001.png").unlink()
    reasons = list(checkpoints.install(elsewhere).refused.values())[0]
    assert len(reasons) == 1 and reasons[0].startswith("the data files differ")
    assert reasons[0].endswith("data files 1 changed (train/dog/000.png); 1 missing (test/cat/001.png)")


def test_the_retrain_switch_recomputes_cached_stages_once(tiny_params, monkeypatch):
    calls = []

    def compute(out, final):
        calls.append(1)
        (out / "n.txt").write_text(str(len(calls)))

    first = cache.cached_stage("data", tiny_params, compute)
    monkeypatch.setenv(cache.RECOMPUTE_ENV, str(time.time() + 1))  # every result so far is older
    again = cache.cached_stage("data", tiny_params, compute)
    assert not again.hit and again.path == first.path and (again.path / "n.txt").read_text() == "2"
    monkeypatch.setenv(cache.RECOMPUTE_ENV, "0")
    assert cache.cached_stage("data", tiny_params, compute).hit and len(calls) == 2


def test_the_stage_log_lists_what_a_run_used(tiny_params, monkeypatch, tmp_path):
    monkeypatch.setenv(cache.STAGE_LOG_ENV, str(tmp_path / "used.jsonl"))
    a = cache.cached_stage("data", tiny_params, lambda out, final: None)
    cache.cached_stage("data", tiny_params, lambda out, final: None)
    assert cache.stages_used(tmp_path / "used.jsonl") == [f"data/{a.key}"]


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="needs the shared CIFAR-10 copy")
def test_the_shipped_checkpoints_are_what_this_code_computes(monkeypatch):
    """Every shipped file has its manifest's sha256 and every shipped key is the one the committed code and
    params compute: a change that alters a stage's results cannot land without shipping its new results."""
    monkeypatch.delenv("PATCHSEARCH_FIGURES")  # the repository's figures/, not the test's folder
    params = with_resolved_root(load(paths.PARAMS_DIR / "cifar10.yaml"))
    manifest = checkpoints.read_manifest(params.profile)
    assert manifest is not None, "no shipped checkpoints for the default profile"
    lines = checkpoints.verify(params)
    assert len(lines) == len(manifest["stages"]) >= 20
    assert all("files ok; key ok" in line for line in lines), "\n".join(lines)
    size = sum(p.stat().st_size for p in checkpoints.shipped_dir(params.profile).rglob("*") if p.is_file())
    # 70 MiB: the variants' models that notebooks only evaluate are not shipped (a finished evaluation needs
    # no model); with them it was 119 MiB
    assert size < 80 * 2**20, f"shipped checkpoints take {size / 2**20:.0f} MiB"


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="needs the shared CIFAR-10 copy")
@pytest.mark.parametrize("profile", ["cifar10", "cifar10-gpu"])
def test_the_shipped_keys_are_every_cpus_with_or_without_native_bf16(monkeypatch, profile):
    """On 2026-12-08 a CPU with AVX2 only resolved ``precision: auto`` to fp32 and refused 62 of the 66 shipped
    stages (every one but the SSL models, whose precision was asked for outright): a fresh clone would have
    recomputed them for hours. The shipped profiles now ask for bf16 outright, so every shipped key is the one
    a CPU computes, whether it has native bf16 or not."""
    monkeypatch.delenv("PATCHSEARCH_FIGURES")  # the repository's figures/
    monkeypatch.setattr(compute, "device_for_run", lambda: torch.device("cpu"))
    for native in (True, False):
        monkeypatch.setattr(compute, "cpu_has_native_bf16", lambda native=native: native)
        params = with_resolved_root(load(paths.PARAMS_DIR / f"{profile}.yaml"))
        assert (params.compute.precision, params.compute.ssl_precision) == ("bf16", "bf16")
        lines = checkpoints.verify(params)
        assert len(lines) == len(checkpoints.read_manifest(profile)["stages"]) > 0
        refused = [line for line in lines if "key ok" not in line]
        assert not refused, f"native bf16 {native}: " + "\n".join(refused[:3])
    # the check can fail: a profile that left the precision to the machine is refused on one of the two
    monkeypatch.setattr(compute, "cpu_has_native_bf16", lambda: False)
    auto = with_resolved_root(load(paths.PARAMS_DIR / f"{profile}.yaml"))
    auto = dataclasses.replace(auto, compute=dataclasses.replace(auto.compute, precision="fp32"))
    assert any("compute.precision: 'bf16' shipped, 'fp32' here" in line for line in checkpoints.verify(auto))


def test_the_opening_states_the_cost_with_and_without_the_shipped_checkpoints(tiny_params, shipped):
    from helpers import notebook

    manifest, result, _ = shipped
    used = [f"data/{'0' * 16}", f"ssl_filtered/{result.key}"]
    record = {"commit": "0123456789abcdef", "notebook_seconds": {"02_ssl_training": 12.4}}
    io.write_json(paths.published_dir("tiny") / "record.json", {**record, "notebook_stages": {"02_ssl_training": used}})
    text = notebook.opening(tiny_params, "02_ssl_training")
    seconds = manifest["stages"][0]["seconds"]
    assert "attack → **SSL training** → clustering" in text
    before = "12 s in the published `make reproduce` of this profile before this one (commit `0123456`)"
    assert f"{before}, reading 2 cached stage" in text
    assert "1 of them are shipped" in text and f"ssl_filtered {seconds:.0f} s" in text
    assert "no published run" in notebook.opening(tiny_params, "05_search")


def test_a_damaged_cached_copy_is_replaced_and_a_damaged_shipped_file_is_never_served(tiny_params, shipped):
    manifest, result, _ = shipped
    checkpoints.install(tiny_params)
    cached = paths.artifacts_dir() / "ssl_filtered" / result.key / "backbone.safetensors"
    cached.write_bytes(cached.read_bytes()[:100])  # truncated in the cache: reinstalled, not served
    report = checkpoints.install(tiny_params)
    assert report.installed == [f"ssl_filtered/{result.key}"] and checkpoints.unreadable(cached.parent) is None
    # shipped truncated, with a manifest listing the truncated file's own sha256: refused, computed instead
    source = checkpoints.shipped_dir("tiny") / "ssl_filtered" / result.key / "backbone.safetensors"
    source.write_bytes(source.read_bytes()[:100])
    path = checkpoints.shipped_dir("tiny") / checkpoints.MANIFEST
    for entry in manifest["stages"]:
        if entry["stage"] == "ssl_filtered":
            entry["files"]["backbone.safetensors"] = checkpoints.file_fingerprint(source)
    path.write_text(json.dumps(manifest))
    shutil.rmtree(paths.artifacts_dir())
    report = checkpoints.install(tiny_params)
    (reason,) = report.refused[f"ssl_filtered/{result.key}"]
    assert reason.startswith("the shipped backbone.safetensors cannot be read")
    assert not (paths.artifacts_dir() / "ssl_filtered" / result.key).exists()


def test_a_shipped_backbone_with_other_tensors_is_never_served(tiny_params, shipped):
    manifest, result, weights = shipped
    source = checkpoints.shipped_dir("tiny") / "ssl_filtered" / result.key / "backbone.safetensors"
    path = checkpoints.shipped_dir("tiny") / checkpoints.MANIFEST
    first = next(iter(weights))
    for change, expected in (
        (
            lambda w: {("renamed." + k if k == first else k): v for k, v in w.items()},
            "holds other tensors than resnet18",
        ),
        (lambda w: {k: (v[:1] if k == first else v) for k, v in w.items()}, f"{first} has shape"),
    ):  # readable files, listed with their own sha256, that the profile's network cannot load
        io.save_weights(source, {k: v.clone() for k, v in change(weights).items()}, {"precision": "bf16"})
        for entry in manifest["stages"]:
            if entry["stage"] == "ssl_filtered":
                entry["files"]["backbone.safetensors"] = checkpoints.file_fingerprint(source)
        path.write_text(json.dumps(manifest))
        shutil.rmtree(paths.artifacts_dir(), ignore_errors=True)
        report = checkpoints.install(tiny_params)
        (reason,) = report.refused[f"ssl_filtered/{result.key}"]
        assert reason.startswith("the shipped backbone.safetensors") and expected in reason, reason
        assert not (paths.artifacts_dir() / "ssl_filtered" / result.key).exists()


def test_a_manifest_without_stages_is_named(tiny_params, shipped):
    path = checkpoints.shipped_dir("tiny") / checkpoints.MANIFEST
    path.write_text("{}")
    with pytest.raises(CheckpointError, match=r"MANIFEST.json: no 'stages' list"):
        checkpoints.install(tiny_params)


def test_a_key_left_out_at_its_old_value_is_part_of_a_shipped_variant():
    """A stage shipped with ``poisoncam_score`` at its old value has no such key in its params; where the
    profile now says otherwise, the stage is a variant that sets it back (and only for PoisonCAM's stages)."""
    base = checkpoints.from_dict({"profile": "x", "search": {"poisoncam_score": "into_vs_flat"}})
    stage = {"search": {**base.to_dict()["search"], "method": "poisoncam"}}
    del stage["search"]["poisoncam_score"]
    assert checkpoints._variant(stage, base) == {"search": {"method": "poisoncam", "poisoncam_score": "changed"}}
    stage["search"]["method"] = "patchsearch"  # PatchSearch never reads it: no variant
    assert checkpoints._variant(stage, base) == {}


def test_a_reship_keeps_the_bytes_of_an_unchanged_backbone(tiny_params, shipped):
    """An earlier shipping wrote the same fp16 tensors with its metadata in another order: shipping again
    keeps those bytes, so the history does not grow by a model that did not change."""
    _, result, weights = shipped
    path = checkpoints.shipped_dir("tiny") / "ssl_filtered" / result.key / "backbone.safetensors"
    checkpoints.install(tiny_params)  # the cache holds the stage again, as a clone that ships has it
    raw = path.read_bytes()  # the same header written another way (indented), the same tensor bytes
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + n]), indent=1).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n :])
    before = path.read_bytes()
    assert before != raw and io.load_weights(path).keys() == weights.keys()
    used = [f"ssl_filtered/{result.key}"]
    checkpoints.ship(write_record(tiny_params, used))
    assert path.read_bytes() == before


def test_a_cached_clustering_with_its_features_counts_as_the_shipped_one_only_where_the_rest_is_equal(tmp_path):
    source, final = tmp_path / "shipped", tmp_path / "cache"
    source.mkdir()
    final.mkdir()
    assignment = np.arange(10) % 3
    np.savez(source / "clustering.npz", assignment=assignment, centroids=np.eye(3))  # shipped: no features
    entry = {"files": {"clustering.npz": "sha", "params.yaml": "sha"}}
    np.savez(final / "clustering.npz", assignment=assignment, centroids=np.eye(3), features=np.ones((10, 4)))
    assert checkpoints._damaged_copy(source, final, entry) is None  # computed here, features kept: served
    np.savez(final / "clustering.npz", assignment=assignment[::-1], centroids=np.eye(3), features=np.ones((10, 4)))
    assert (
        checkpoints._damaged_copy(source, final, entry) == "clustering.npz differs from the shipped file in assignment"
    )
    np.savez(final / "clustering.npz", assignment=assignment)
    assert "in centroids" in checkpoints._damaged_copy(source, final, entry)
    (final / "clustering.npz").write_bytes(b"PK\x03\x04 truncated")
    assert "unreadable" in checkpoints._damaged_copy(source, final, entry)
    (final / "clustering.npz").unlink()
    assert checkpoints._damaged_copy(source, final, entry) == "clustering.npz missing"
