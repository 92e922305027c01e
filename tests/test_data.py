import numpy as np
import pytest
from PIL import Image

from helpers import data
from helpers.paths import DataError
from tests.conftest import make_image_folder


def test_scan_lists_sorted_classes_and_files(tiny_root):
    images = data.scan_image_folder(tiny_root / "train")
    assert images.classes == ["cat", "dog", "frog"]
    assert np.bincount(images.labels).tolist() == [8, 10, 6]
    assert images.paths[0].endswith("train/cat/000.png") and images.paths[8].endswith("train/dog/000.png")


def test_missing_split_folder_names_the_path(tmp_path):
    with pytest.raises(DataError, match=f"split folder not found: {tmp_path / 'nope'}"):
        data.scan_image_folder(tmp_path / "nope")


def test_no_class_folders_is_an_error(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "stray.png").write_bytes(b"")
    with pytest.raises(DataError, match="no class folders in .*train"):
        data.scan_image_folder(tmp_path / "train")


def test_empty_class_folder_names_the_folder(tmp_path):
    make_image_folder(tmp_path / "train", classes=("a",), per_class=(2,))
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*train/b has no images"):
        data.scan_image_folder(tmp_path / "train")


@pytest.mark.parametrize("content", [b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 20])
def test_corrupt_image_names_the_file(tmp_path, content):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(content)
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        data.load_rgb(bad)


def test_truncated_image_names_the_file(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(DataError, match=f"cannot read image {truncated}"):
        data.load_rgb(truncated)


def test_decode_reports_the_corrupt_file_in_a_folder(tiny_root):
    bad = tiny_root / "train" / "dog" / "005.png"
    bad.write_bytes(b"garbage")
    images = data.scan_image_folder(tiny_root / "train")
    with pytest.raises(DataError, match=str(bad)):
        data.decode_images(images.paths, progress=False)


def test_grayscale_cmyk_alpha_and_palette_become_rgb(tmp_path):
    gray = Image.fromarray(np.full((4, 5), 77, dtype=np.uint8), mode="L")
    gray.save(tmp_path / "gray.png")
    Image.new("CMYK", (5, 4), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")  # CMYK white
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    palette = Image.new("P", (5, 4), 0)
    palette.putpalette([10, 20, 30] + [0] * 765)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    assert (data.load_rgb(tmp_path / "gray.png") == 77).all()
    cmyk = data.load_rgb(tmp_path / "cmyk.jpg")
    assert cmyk.shape == (4, 5, 3) and cmyk.min() >= 250
    assert data.load_rgb(tmp_path / "rgba.png")[0, 0].tolist() == [200, 0, 0]
    assert data.load_rgb(tmp_path / "palette.png")[0, 0].tolist() == [10, 20, 30]
    for name in ("gray.png", "cmyk.jpg", "rgba.png", "palette.png"):
        assert data.load_rgb(tmp_path / name).dtype == np.uint8


def test_file_list_round_trip(tiny_root, tmp_path):
    images = data.scan_image_folder(tiny_root / "train")
    data.write_file_list(tmp_path / "list.txt", images)
    first = (tmp_path / "list.txt").read_text().splitlines()[0]
    assert first == f"{images.paths[0]} 0"
    back = data.read_file_list(tmp_path / "list.txt", images.classes)
    assert back.paths == images.paths and np.array_equal(back.labels, images.labels)
    assert back.classes == images.classes


def test_file_list_relative_paths_and_spaces(tmp_path):
    folder = tmp_path / "with space"
    make_image_folder(folder, classes=("a", "b"), per_class=(1, 1))
    (folder / "list.txt").write_text("a/000.png 0\n\nb/000.png 1\n")
    images = data.read_file_list(folder / "list.txt")
    assert images.paths == [str(folder / "a/000.png"), str(folder / "b/000.png")]
    assert images.classes == ["0", "1"]


@pytest.mark.parametrize("line", ["just_a_path.png", "a.png cat", "a.png -1", ""])
def test_file_list_bad_line_names_file_and_line(tmp_path, line):
    make_image_folder(tmp_path, classes=("a",), per_class=(1,))
    text = f"{tmp_path}/a/000.png 0\n{line}\n"
    (tmp_path / "list.txt").write_text(text)
    if line == "":
        assert len(data.read_file_list(tmp_path / "list.txt")) == 1  # blank lines are allowed
        return
    with pytest.raises(DataError, match=r"list.txt line 2: expected '<path> <class index>'"):
        data.read_file_list(tmp_path / "list.txt")


def test_file_list_missing_image_and_missing_list(tmp_path):
    (tmp_path / "list.txt").write_text(f"{tmp_path}/gone.png 0\n")
    with pytest.raises(DataError, match=r"list.txt line 1: image not found: .*gone.png"):
        data.read_file_list(tmp_path / "list.txt")
    with pytest.raises(DataError, match="file list not found: .*absent.txt"):
        data.read_file_list(tmp_path / "absent.txt")


def test_file_list_class_index_beyond_known_classes(tmp_path):
    make_image_folder(tmp_path, classes=("a",), per_class=(1,))
    (tmp_path / "list.txt").write_text(f"{tmp_path}/a/000.png 5\n")
    with pytest.raises(DataError, match="class index 5 but only 2 classes"):
        data.read_file_list(tmp_path / "list.txt", ["x", "y"])


def test_decode_is_exact_and_channels_first(tiny_root):
    images = data.scan_image_folder(tiny_root / "test")
    pixels = data.decode_images(images.paths, progress=False)
    assert pixels.shape == (9, 3, 20, 20) and pixels.dtype == np.uint8
    assert np.array_equal(pixels[4].transpose(1, 2, 0), np.asarray(Image.open(images.paths[4])))


def test_decode_mixed_sizes_needs_image_size(tmp_path):
    make_image_folder(tmp_path / "a", classes=("x",), per_class=(1,), size=(20, 20))
    make_image_folder(tmp_path / "b", classes=("x",), per_class=(1,), size=(30, 24))
    paths = [str(tmp_path / "a/x/000.png"), str(tmp_path / "b/x/000.png")]
    with pytest.raises(DataError, match="differ in size .*set data.image_size"):
        data.decode_images(paths, progress=False)
    assert data.decode_images(paths, image_size=16, progress=False).shape == (2, 3, 16, 16)


def test_subset_per_class_counts_and_seed(tiny_root):
    labels = data.scan_image_folder(tiny_root / "train").labels
    subset = data.subset_per_class(labels, 7, seed=0)
    assert np.bincount(labels[subset]).tolist() == [7, 7, 6]
    assert np.array_equal(subset, data.subset_per_class(labels, 7, seed=0))
    assert not np.array_equal(subset, data.subset_per_class(labels, 7, seed=1))
    assert np.array_equal(data.subset_per_class(labels, None, seed=0), np.arange(len(labels)))


def test_load_data_caches_decoded_pixels(tiny_params):
    first = data.load_data(tiny_params, progress=False)
    again = data.load_data(tiny_params, progress=False)
    assert first.stage_path == again.stage_path
    assert first.train.pixels.shape == (24, 3, 20, 20) and first.val.pixels.shape == (9, 3, 20, 20)
    assert np.array_equal(np.asarray(first.train.pixels), np.asarray(again.train.pixels))
    assert first.train.images.paths == again.train.images.paths
