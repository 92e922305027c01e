"""``make data``: download CIFAR-10 through torchvision and write the JPEG ImageFolder layout.

    python -m helpers.fetch_data [--out data/cifar10]

Writes ``<out>/train/<class>/NNNN.jpg`` (5,000 per class) and ``<out>/test/<class>/NNNN.jpg`` (1,000 per
class), JPEG quality 75, the layout of the shared copy this project reads by default. Needs a network
(torchvision downloads the official pickled batches); the conversion itself is tested offline.
"""

from __future__ import annotations

import argparse
import pickle
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from . import paths

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch not found: {path}")
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def convert_cifar_batches(
    batches_dir: str | Path, out_root: str | Path, quality: int = 75, progress: bool = True
) -> dict[str, int]:
    """Convert the pickled batches in ``batches_dir`` (``cifar-10-batches-py``) to JPEG ImageFolder splits.

    Images are numbered per class in batch order. The output appears only once complete (written to a
    temporary folder, then renamed). Returns the number of images per split."""
    batches_dir, out_root = Path(batches_dir), Path(out_root)
    classes = _unpickle(batches_dir / "batches.meta")["label_names"]
    tmp = out_root.with_name(out_root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    for split, batch_names in (("train", TRAIN_BATCHES), ("test", TEST_BATCHES)):
        per_class = [0] * len(classes)
        for name in classes:
            (tmp / split / name).mkdir(parents=True)
        for batch_name in batch_names:
            batch = _unpickle(batches_dir / batch_name)
            images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for image, label in tqdm(
                zip(images, batch["labels"], strict=True),
                total=len(images),
                desc=f"{split} {batch_name}",
                disable=not progress,
            ):
                path = tmp / split / classes[label] / f"{per_class[label]:04d}.jpg"
                Image.fromarray(image).save(path, quality=quality)
                per_class[label] += 1
        counts[split] = sum(per_class)
    if out_root.exists():
        shutil.rmtree(out_root)
    tmp.rename(out_root)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(paths.REPO_ROOT / "data" / "cifar10"))
    parser.add_argument("--download-dir", default=str(paths.REPO_ROOT / "data" / "downloads"))
    args = parser.parse_args(argv)
    from torchvision.datasets import CIFAR10

    CIFAR10(args.download_dir, train=True, download=True)  # fetches and checks the official archive
    counts = convert_cifar_batches(Path(args.download_dir) / "cifar-10-batches-py", args.out)
    print(f"wrote {counts} images to {args.out}")


if __name__ == "__main__":
    main()
