"""Choosing a variant's SSL settings without the test split: kNN accuracy on held-out *training* images.

    python -m helpers.studies.heldout --params params/cifar10.yaml --name byol-default '{"ssl": {"method": "byol"}}' \
        --name byol-m0996 '{"ssl": {"method": "byol", "momentum": 0.996}}' ...

Each candidate (the profile with its overrides) trains its backdoored model (the cached ``ssl_poisoned``
stage, which the variant's rows use anyway); its features classify, by kNN over the profile's training
subset and its labels, ``per_class`` images per category drawn from the training split *outside* that
subset. No validation image is read, so the choice cannot leak into the reported numbers. Writes
``figures/<profile>/07_heldout_selection.{csv,md}``; the BYOL variant of ``params/cifar10.yaml`` was chosen
this way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from .. import plotting
from ..data import decode_images, load_data, scan_image_folder
from ..evaluate import knn_predict
from ..models import extract_features
from ..params import Params
from ..ssl import augment_config, load_backbone, train_stage


def heldout_images(params: Params, per_class: int = 500, seed: int = 123) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of each category of the training split that the profile's subset leaves out:
    uint8 pixels and labels."""
    data = load_data(params, progress=False)
    full = scan_image_folder(Path(params.data.root) / params.data.train_split)
    inside = set(data.train.images.paths)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(len(full.classes)):
        outside = [i for i in np.flatnonzero(full.labels == c) if full.paths[i] not in inside]
        if len(outside) < per_class:
            raise ValueError(f"only {len(outside)} training images of {full.classes[c]} lie outside the subset")
        chosen.append(rng.choice(outside, per_class, replace=False))
    idx = np.concatenate(chosen)
    return decode_images([full.paths[i] for i in idx], params.data.image_size, progress=False), full.labels[idx]


def heldout_knn(params: Params, pixels: np.ndarray, labels: np.ndarray, progress: bool = False) -> float:
    """kNN accuracy (the profile's k and temperature) of the backdoored model of ``params`` on held-out images."""
    data = load_data(params, progress=False)
    size = data.train.pixels.shape[-1]
    backbone = load_backbone(params, train_stage(params, "poisoned", progress=progress), size)
    cfg, e = augment_config(params.ssl, size), params.eval
    train = extract_features(
        backbone, data.train.pixels, cfg.mean, cfg.std, e.batch_size, False, "train", params.compute.precision
    )
    held = extract_features(
        backbone, pixels, cfg.mean, cfg.std, e.batch_size, False, "held out", params.compute.precision
    )
    preds = knn_predict(train, data.train.labels, held, len(data.train.classes), e.knn_k, e.knn_temperature)
    return float((preds == labels).mean())


def main(argv: list[str] | None = None) -> None:
    from ..notebook import setup

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params/cifar10.yaml")
    parser.add_argument("--name", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), required=True)
    parser.add_argument("--per-class", type=int, default=500)
    args = parser.parse_args(argv)
    base = setup(args.params)
    pixels, labels = heldout_images(base, args.per_class)
    rows = []
    for name, overrides in args.name:
        p = setup(args.params, overrides=json.loads(overrides))
        acc = heldout_knn(p, pixels, labels, progress=True)
        rows.append({"candidate": name, "overrides": overrides, "held-out kNN acc (%)": round(100 * acc, 1)})
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table["held-out images"] = len(labels)
    plotting.save_table(table, base.profile, "07_heldout", "selection", published=True)


if __name__ == "__main__":
    main()
