"""Data layer: ImageFolder splits, SSL-Backdoor file lists, robust image loading, the decoded-image cache.

- ``scan_image_folder``: ``<split>/<class>/<image>`` as torchvision's ImageFolder reads it (classes sorted).
- ``read_file_list`` / ``write_file_list``: the SSL-Backdoor format, one ``<path> <class index>`` per line,
  so data poisoned by the official attack code can be defended here and vice versa.
- ``load_rgb``: any image PIL reads, grayscale / CMYK / palette / alpha converted to RGB.
- ``load_data``: the cached ``data`` stage: the (optionally subsetted) splits decoded once into uint8 arrays.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from . import io
from .cache import cached_stage
from .params import Params
from .paths import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageList:
    """Image paths with their class indices: a split, a subset of one, or a file list."""

    paths: list[str]
    labels: np.ndarray  # int64, one per path
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: np.ndarray) -> ImageList:
        return ImageList([self.paths[i] for i in indices], self.labels[indices], self.classes)

    def class_index(self, name: str) -> int:
        if name not in self.classes:
            raise DataError(f"class '{name}' not in the data set (classes: {', '.join(self.classes)})")
        return self.classes.index(name)


def scan_image_folder(split_dir: str | Path) -> ImageList:
    """List ``split_dir/<class>/<image>`` in sorted class and file order, as ImageFolder does."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(
            f"split folder not found: {split_dir} (expected the ImageFolder layout <root>/<split>/<class>/<image>)"
        )
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {split_dir} (expected <split>/<class>/<image>)")
    split_dir = split_dir.resolve()  # once: resolving every file costs seconds on 60k images
    paths, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(
            e.path for e in os.scandir(split_dir / name) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise DataError(f"class folder {split_dir / name} has no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
        paths += files
        labels += [index] * len(files)
    return ImageList(paths, np.asarray(labels, dtype=np.int64), classes)


def read_file_list(list_path: str | Path, classes: list[str] | None = None) -> ImageList:
    """Read an SSL-Backdoor file list: ``<path> <class index>`` per line; relative paths are taken from
    the list's folder. ``classes`` names the indices (default: the indices themselves)."""
    list_path = Path(list_path)
    if not list_path.is_file():
        raise DataError(f"file list not found: {list_path}")
    paths, labels = [], []
    for number, line in enumerate(list_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)  # a path may contain spaces; the class index may not
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(f"{list_path} line {number}: expected '<path> <class index>', got {line!r}")
        path = Path(parts[0])
        if not path.is_absolute():
            path = list_path.parent / path
        if not path.is_file():
            raise DataError(f"{list_path} line {number}: image not found: {path}")
        paths.append(str(path))
        labels.append(int(parts[1]))
    if not paths:
        raise DataError(f"file list is empty: {list_path}")
    labels_array = np.asarray(labels, dtype=np.int64)
    n_classes = int(labels_array.max()) + 1
    if classes is None:
        classes = [str(i) for i in range(n_classes)]
    elif n_classes > len(classes):
        raise DataError(f"{list_path}: class index {n_classes - 1} but only {len(classes)} classes are known")
    return ImageList(paths, labels_array, list(classes))


def write_file_list(list_path: str | Path, images: ImageList) -> Path:
    """Write ``<absolute path> <class index>`` per line (atomically)."""
    lines = [f"{Path(p).absolute()} {int(y)}\n" for p, y in zip(images.paths, images.labels, strict=True)]
    return io.write_text(list_path, "".join(lines))


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to an ``H x W x 3`` uint8 RGB array.

    Grayscale, CMYK and palette images are converted; an alpha channel is dropped (as torchvision's
    ImageFolder loader does). Unreadable or truncated files raise ``DataError`` naming the file.
    """
    try:
        with Image.open(path) as im:
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # palette transparency must go through RGBA to convert cleanly
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError as e:
        raise DataError(f"image not found: {path}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def image_hw(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size / 0.875`` (256 for 224) and centre-crop ``size x size``,
    the standard evaluation transform the official attack applies before pasting on validation images."""
    h, w = image.shape[:2]
    short = round(size / 0.875)
    scale = short / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size]


def decode_images(
    paths: list[str], image_size: int | None = None, progress: bool = True, desc: str = "decode"
) -> np.ndarray:
    """Decode images into one ``N x 3 x H x W`` uint8 array (threads: PIL releases the GIL while decoding).

    With ``image_size`` every image is resized and centre-cropped to it; without, all images must share
    one size (an error names the first that does not)."""

    def load(path: str) -> np.ndarray:
        image = load_rgb(path)
        return resize_center_crop(image, image_size) if image_size else image

    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        images = list(tqdm(pool.map(load, paths, chunksize=256), total=len(paths), desc=desc, disable=not progress))
    if not images:
        return np.zeros((0, 3, image_size or 0, image_size or 0), dtype=np.uint8)
    first = images[0].shape
    for path, image in zip(paths, images, strict=True):
        if image.shape != first:
            raise DataError(
                f"images differ in size ({paths[0]} is {first[1]}x{first[0]}, {path} is "
                f"{image.shape[1]}x{image.shape[0]}): set data.image_size to resize them for the cache"
            )
    return np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))


def subset_per_class(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset with at most ``per_class`` images of each class."""
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        chosen.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


@dataclass
class Split:
    """A decoded split: the image list and its uint8 ``N x 3 x H x W`` pixels."""

    images: ImageList
    pixels: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        return self.images.labels

    @property
    def classes(self) -> list[str]:
        return self.images.classes

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.pixels))


@dataclass
class Data:
    train: Split
    val: Split
    stage_path: Path


def select_split(params: Params, which: str) -> ImageList:
    """The split ``which`` ('train' or 'val') of the data root, with the profile's per-class subset."""
    d = params.data
    split, per_class = (d.train_split, d.train_per_class) if which == "train" else (d.val_split, d.val_per_class)
    images = scan_image_folder(Path(d.root) / split)
    return images.subset(subset_per_class(images.labels, per_class, d.seed + (which == "val")))


def load_data(params: Params, progress: bool = True) -> Data:
    """The cached ``data`` stage: file lists and decoded pixels of both splits (params with resolved root)."""

    def compute(out: Path, final: Path) -> None:
        for which in ("train", "val"):
            images = select_split(params, which)
            write_file_list(out / f"{which}.txt", images)
            io.save_npy(
                out / f"{which}_pixels.npy",
                decode_images(images.paths, params.data.image_size, progress, desc=f"decode {which}"),
            )
            io.write_json(out / f"{which}_classes.json", images.classes)

    result = cached_stage("data", params, compute)
    splits = {}
    for which in ("train", "val"):
        classes = json.loads((result.path / f"{which}_classes.json").read_text())
        images = read_file_list(result.path / f"{which}.txt", classes)
        splits[which] = Split(images, np.load(result.path / f"{which}_pixels.npy", mmap_mode="c"))
    return Data(splits["train"], splits["val"], result.path)
