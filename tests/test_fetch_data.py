import pickle

import numpy as np
import pytest

from helpers import data, fetch_data


def write_fake_batches(folder, per_batch=6, seed=0):
    """Pickled batches in the official CIFAR-10 python format, small enough for a test."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    classes = ["airplane", "automobile", "bird"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": classes}, f)
    originals = {}
    for name in fetch_data.TRAIN_BATCHES + fetch_data.TEST_BATCHES:
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
    counts = fetch_data.convert_cifar_batches(tmp_path / "cifar-10-batches-py", tmp_path / "out", progress=False)
    assert counts == {"train": 30, "test": 6}
    train = data.scan_image_folder(tmp_path / "out" / "train")
    assert train.classes == sorted(classes) == classes
    expected = np.bincount(sum((originals[b][1] for b in fetch_data.TRAIN_BATCHES), []), minlength=3)
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
        fetch_data.convert_cifar_batches(tmp_path / "b", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
