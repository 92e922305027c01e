"""The GPU queue (helpers.runners.gpu) end to end on this CPU, on a tiny version of params/cifar10-gpu.yaml: every job
prepared, run and installed through the same functions as on a GPU; the parts, the hashes, the fp16
backbones; and the torch k-means that serves where faiss is missing."""

import json
import shutil

import numpy as np
import pytest
import yaml

from helpers import cluster, paths
from helpers import params as params_mod
from helpers.runners import checkpoints, gpu

# The profile at a size this CPU runs in seconds: the same sections and rules, fewer and smaller everything
TINY = {
    "profile": "cifar10-gpu-tiny",
    "data": {"train_per_class": 16, "val_per_class": 6},
    "ssl": {"width": 8, "stem_stride": 2, "epochs": 3, "batch_size": 32, "proj_hidden": 32, "queue_size": 64},
    "eval": {"probe_seeds": 1, "probe_epochs": 5, "batch_size": 256},
    "cluster": {"k": 8, "batch_size": 256},
    "search": {"window_sweep": [5, 7], "window_draws": 1, "window_top_k": 3, "cam_layer": "layer3", "masks": 8,
               "mask_grid": 4, "save_top": 4, "batch_size": 256},
    "classifier": {"top_k": 3, "n_models": 1, "width": 8, "stem_stride": 2, "max_iters": 6, "eval_every": 3,
                   "patience": 1},
}  # fmt: skip


def mini_cifar10(dest, per_class=20):
    """The first images of every class of each split of the CIFAR-10 the profiles read, in its layout."""
    source = params_mod.resolve_data_root(params_mod.load(gpu.PARAMS))
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for folder in sorted((source / split).iterdir()):
            (dest / split / folder.name).mkdir(parents=True)
            for path in sorted(folder.iterdir())[:n]:
                shutil.copyfile(path, dest / split / folder.name / path.name)
    return dest


def tiny_profile(tmp_path):
    """params/cifar10-gpu.yaml with TINY's values, as a file (with a comment on its epochs line, which
    ``install`` rewrites), on a few CIFAR-10 images of every class."""
    raw = yaml.safe_load(gpu.PARAMS.read_text())
    raw["profile"] = TINY["profile"]
    raw["data"]["root"] = str(mini_cifar10(tmp_path / "cifar10"))
    for section, values in TINY.items():
        if section != "profile":
            assert set(values) <= set(raw[section]), f"{section}: {set(values) - set(raw[section])} not in the profile"
            raw[section].update(values)
    path = tmp_path / "cifar10-gpu-tiny.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False).replace("  epochs: 3\n", "  epochs: 3  # the aim\n", 1))
    return path


def test_split_and_join_check_every_part(tmp_path):
    blob = np.random.default_rng(0).integers(0, 256, 2500, dtype=np.uint8).tobytes()
    (tmp_path / "a.bin").write_bytes(blob)
    out = tmp_path / "out"
    out.mkdir()
    parts = gpu.split_file(tmp_path / "a.bin", out, part_bytes=1000)
    assert [p["bytes"] for p in parts] == [1000, 1000, 500]
    sha = gpu.file_fingerprint(tmp_path / "a.bin")
    assert gpu.join_parts(out, parts, tmp_path / "b.bin", sha).read_bytes() == blob
    damaged = bytearray((out / parts[1]["name"]).read_bytes())
    damaged[7] ^= 1
    (out / parts[1]["name"]).write_bytes(bytes(damaged))
    with pytest.raises(gpu.QueueError, match=r"a\.bin\.001: sha256 differs"):
        gpu.join_parts(out, parts, tmp_path / "c.bin", sha)
    (out / parts[2]["name"]).unlink()
    with pytest.raises(gpu.QueueError, match="part missing"):
        gpu.join_parts(out, [parts[0], parts[2]], tmp_path / "d.bin", sha)


def test_data_pack_gives_back_the_same_files(tiny_root, tmp_path):
    info = gpu.pack_data(tiny_root, tmp_path / "data.pack")
    assert info["files"] == len([p for p in tiny_root.rglob("*") if p.is_file()])
    back = gpu.unpack_data(tmp_path / "data.pack", tmp_path / "back")
    for path in tiny_root.rglob("*.png"):
        assert (back / path.relative_to(tiny_root)).read_bytes() == path.read_bytes()
    raw = bytearray((tmp_path / "data.pack").read_bytes())
    raw[-40:] = bytes(40)  # a damaged stream fails
    (tmp_path / "bad.pack").write_bytes(bytes(raw))
    with pytest.raises(Exception):  # noqa: B017 (zlib.error or QueueError: either names the damage)
        gpu.unpack_data(tmp_path / "bad.pack", tmp_path / "bad")


def test_epochs_fit_the_budget_and_are_written_into_the_profile(tmp_path):
    assert gpu.choose_epochs(rate=10_000, n_images=50_000, seconds=600, aim=200) == 120
    assert gpu.choose_epochs(rate=100_000, n_images=50_000, seconds=600, aim=200) == 200
    text = gpu._with_epochs(gpu.PARAMS, 87, "set by a test")
    assert params_mod.from_dict(yaml.safe_load(text)).ssl.epochs == 87
    assert "  epochs: 87  # set by a test\n" in text and text.count("epochs: 87") == 1


def test_every_job_carries_at_most_one_backbone():
    """What travels to the GPU: the repository (~11 MiB), the data pack (19 MiB) and the carried stages; a
    ResNet-18 backbone is 21 MiB in fp16, so two would pass the 64 MiB the device takes."""
    for job in gpu.JOBS:
        backbones = [need for need in job.needs if need.split(":")[-1].split("@")[0].startswith("ssl_")]
        assert len(backbones) <= 1, (job.name, backbones)
    assert [job.name for job in gpu.JOBS] == [f"J{i}" for i in range(1, len(gpu.JOBS) + 1)]


def test_torch_kmeans_matches_faiss_within_one_percent_of_inertia():
    rng = np.random.default_rng(0)
    ratios = []
    for seed in range(3):
        centres = rng.normal(size=(40, 128)) * 0.3
        x = centres[rng.integers(0, 40, 4000)] + rng.normal(size=(4000, 128))
        ours, ref = cluster.kmeans_torch(x, 40, seed, 20, device="cpu"), cluster.kmeans(x, 40, seed, 20)
        assert ours.backend == "torch" and ref.backend == "faiss"
        assert len(np.unique(ours.assignment)) == 40  # no empty cluster left
        assert np.allclose(np.linalg.norm(ours.centroids, axis=1), 1, atol=1e-5)
        ratios.append(cluster.inertia(x, ours) / cluster.inertia(x, ref))
    assert abs(np.mean(ratios) - 1) < 0.01, ratios


def test_kmeans_falls_back_to_torch_without_faiss(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("no faiss here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    x = np.random.default_rng(1).normal(size=(300, 16))
    assert cluster.kmeans(x, 5, 0, 10).backend == "torch"


@pytest.mark.notebooks  # minutes: every job of the queue at tiny size
def test_the_whole_queue_runs_on_a_cpu_and_ships_every_job(tmp_path, monkeypatch):
    profile = tiny_profile(tmp_path)
    staging, back = tmp_path / "staging", tmp_path / "back"
    params = params_mod.load(profile)
    for job in gpu.JOBS:
        description = gpu.prepare(profile, staging)
        assert description["job"] == job.name
        if back.exists():
            shutil.rmtree(back)
        record = gpu.run(back, staging, budget_s=900, work=tmp_path / "device")
        print(job.name, record["seconds"], [p["seconds"] for p in record["phases"]])
        assert record["complete"], (job.name, (tmp_path / "device" / "job.log").read_text()[-3000:])
        files = sorted(p.name for p in back.iterdir())
        assert len(files) <= 8 and "job.json" in files
        assert all(p.stat().st_size <= 16 * 2**20 for p in back.iterdir())
        if job.trains and not job.sets_epochs:  # timed from J1's training, not from a warm-up
            assert description["training_reference"]["job"] == "J1"
            assert record["warmup"]["reference"]["seconds"] == gpu.read_manifest(params.profile)["jobs"]["J1"][
                "phases"][0]["seconds"]  # fmt: skip
        gpu.install(back, profile)
    manifest = gpu.read_manifest(params.profile)
    assert gpu.next_job(manifest) is None and set(manifest["jobs"]) == set(gpu.JOB_BY_NAME)
    # the warm-up's epochs are in the profile now, and every shipped key is the one this CPU asks for
    params = params_mod.with_resolved_root(params_mod.load(profile))
    assert params.ssl.epochs == manifest["jobs"]["J1"]["epochs"]["chosen"] >= 1
    lines = checkpoints.verify(params)
    assert lines and all("key ok" in line for line in lines), [x for x in lines if "key ok" not in x]
    stages = {e["stage"] for e in manifest["stages"]}
    assert {"ssl_poisoned", "ssl_clean", "eval_poisoned", "cluster_poisoned", "search_poisoned",
            "classifier_poisoned", "ssl_filtered", "eval_filtered"} <= stages  # fmt: skip
    # backbones shipped in fp16, the clustering without its features
    from safetensors.torch import load_file

    ssl = next(e for e in manifest["stages"] if e["stage"] == "ssl_poisoned" and not e["variant"])
    weights = load_file(str(gpu.shipped_dir(params.profile) / "ssl_poisoned" / ssl["key"] / "backbone.safetensors"))
    assert {str(t.dtype) for t in weights.values() if t.is_floating_point()} == {"torch.float16"}
    clustering = next(e for e in manifest["stages"] if e["stage"] == "cluster_poisoned")
    assert "clustering.npz:features" in clustering["left_out"]
    # a reader's run installs them all and computes none of them
    report = checkpoints.install(params)
    assert not report.refused and len(report.installed) == len(manifest["stages"])
    assert "bench" in (gpu.shipped_dir(params.profile) / "logs" / "J3" / "bench.md").read_text().lower()
    assert json.loads((paths.artifacts_dir() / "ssl_poisoned" / ssl["key"] / "stage.json").read_text())["shipped"]
    # the queue's report: every job done, and the backdoor's verdict computed from the shipped probes
    report = (gpu.shipped_dir(params.profile).parent / gpu.REPORT_NAME).read_text()
    assert all(f"| {job.name} | done | " in report for job in gpu.JOBS)
    # every evaluated variant of the attack gets its own table: J2's stronger attack and J5's pairs
    for name in ("strong", "pair2", "pair3"):
        assert f"**The backdoor of the variant `{name}` (attack." in report, name
    assert "attack.poison_rate = 1.0, attack.trigger_size = 0.3125" in report
    verdict = gpu.backdoor_verdict(params.profile, 0.1)
    assert (
        f"10% labels: ASR {100 * verdict['asr']:.1f}% against the clean model's {100 * verdict['clean_asr']:.1f}%"
        in report
    )
