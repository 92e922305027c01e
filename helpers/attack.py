"""The patch-trigger backdoor attack on SSL (Saha et al., CVPR 2022), as PatchSearch evaluates it.

Threat model: the attacker pastes a small trigger patch, fully opaque, on part of one target category's
images of an unlabelled training set. A model pre-trained on it should tie the trigger to the target, so a
downstream classifier on top calls any patched image the target category.

Defaults follow the papers: HTBA-style triggers (a random 4x4 colour grid upsampled bilinearly, Saha et al.
AAAI 2020); trigger side 50 px at 224 px (~5% of the area) scaled to the image; 50% of the target category
poisoned; top-left corner uniform in [0.25 W, 0.75 W - w] on training poisons and in [0.10 W, 0.90 W - w]
on the patched validation set (all non-target validation images); optionally several triggers per image
(PatchSearch Table 9).

Outputs (the cached ``attack`` stage): the trigger, the exact seeded recipe (which images, which boxes),
the poisoned images as PNG files with SSL-Backdoor file lists, and the ground truth under
``ground_truth/`` for evaluation only: the defenses never read it.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from . import io
from .cache import cached_stage
from .data import Data, ImageList, decode_images, image_hw, load_rgb, read_file_list, write_file_list
from .kernels import paste_patches
from .params import AttackParams, Params, resolve_input_path
from .paths import DataError


class AttackError(ValueError):
    """Attack settings that cannot be carried out on this data; the message names the parameter."""


@dataclass(frozen=True)
class Trigger:
    """A trigger that can be rendered at any side length.

    ``source`` is either the random colour grid (``3 x g x g`` uint8) or a user PNG (``3 x H x W`` uint8);
    ``at(side)`` upsamples it bilinearly (as HTBA does) to a ``3 x side x side`` uint8 tensor."""

    source: torch.Tensor

    def at(self, side: int) -> torch.Tensor:
        if tuple(self.source.shape[-2:]) == (side, side):
            return self.source.clone()
        resized = F.interpolate(self.source[None].float(), size=(side, side), mode="bilinear", align_corners=False)
        return resized[0].round().clamp(0, 255).to(torch.uint8)


def make_trigger(a: AttackParams) -> Trigger:
    """The HTBA-style random colour grid (seeded), or the PNG that ``attack.trigger`` names."""
    if a.trigger == "random":
        rng = np.random.default_rng(a.trigger_seed)
        grid = rng.integers(0, 256, size=(3, a.trigger_grid, a.trigger_grid), dtype=np.uint8)
        return Trigger(torch.from_numpy(grid))
    path = resolve_input_path(a.trigger)  # relative to the repository, as the cache key reads it
    if not path.is_file():
        raise AttackError(f"attack.trigger: trigger image not found: {path} (use 'random' or a PNG path)")
    try:
        pixels = load_rgb(path)
    except DataError as e:
        raise AttackError(f"attack.trigger: {e}") from e
    return Trigger(torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))))


def trigger_side(a: AttackParams, height: int, width: int) -> int:
    """``attack.trigger_px`` if set, else ``attack.trigger_size`` times the shorter side."""
    return a.trigger_px or max(1, round(a.trigger_size * min(height, width)))


def sample_boxes(
    rng: np.random.Generator, sizes_hw: np.ndarray, a: AttackParams, margin: float, n_copies: int, margin_key: str
) -> np.ndarray:
    """``N x n_copies x 4`` boxes ``(x, y, side, side)``: top-left uniform in [m W, (1 - m) W - side]."""
    boxes = np.zeros((len(sizes_hw), n_copies, 4), dtype=np.int64)
    for n, (height, width) in enumerate(sizes_hw):
        side = trigger_side(a, height, width)
        x_lo, y_lo = int(margin * width), int(margin * height)
        x_hi, y_hi = int((1 - margin) * width) - side, int((1 - margin) * height) - side
        if x_hi < x_lo or y_hi < y_lo:
            raise AttackError(
                f"attack.trigger_size = {a.trigger_size} / attack.trigger_px = {a.trigger_px} ({side} px) "
                f"does not fit inside the margin "
                f"attack.{margin_key} = {margin} of a {width}x{height} image: make one of them smaller"
            )
        boxes[n, :, 0] = rng.integers(x_lo, x_hi + 1, size=n_copies)
        boxes[n, :, 1] = rng.integers(y_lo, y_hi + 1, size=n_copies)
        boxes[n, :, 2:] = side
    return boxes


def paste_boxes(pixels: torch.Tensor, trigger: Trigger, boxes: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Paste the trigger into every box: ``pixels`` is ``B x 3 x H x W``, ``boxes`` ``B x copies x 4``.
    One batched kernel call per copy (all boxes of a batch share one side)."""
    boxes = torch.as_tensor(boxes)
    sides = boxes[:, :, 2].unique()
    if len(sides) != 1:
        raise ValueError(f"paste_boxes needs one trigger side per batch, got {sides.tolist()}")
    patch = trigger.at(int(sides[0])).to(pixels.device, pixels.dtype)
    out = pixels.clone()
    for copy in range(boxes.shape[1]):
        paste_patches(out, patch, boxes[:, copy, 0], boxes[:, copy, 1], inplace=True)
    return out


def _save_pngs(pixels: torch.Tensor, paths: list[Path], progress: bool, desc: str) -> None:
    def save(item: tuple[np.ndarray, Path]) -> None:
        array, path = item
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array.transpose(1, 2, 0)).save(path)

    arrays = pixels.numpy()
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(tqdm(pool.map(save, zip(arrays, paths, strict=True)), total=len(paths), desc=desc, disable=not progress))


def _out_path(folder: Path, images: ImageList, index: int) -> Path:
    source = Path(images.paths[index])
    return folder / images.classes[images.labels[index]] / f"{source.stem}.png"


@dataclass
class AttackResult:
    """The planted attack: what the rest of the pipeline and the evaluation read."""

    path: Path
    trigger: Trigger
    target_index: int
    target_class: str
    poison_idx: np.ndarray  # indices into the training list, sorted
    poison_boxes: np.ndarray  # len(poison_idx) x copies x 4, (x, y, w, h) in the original image
    val_idx: np.ndarray  # indices into the validation list: all non-target images
    val_boxes: np.ndarray
    train_poisoned: ImageList  # the poisoned training set as a file list (poisons point to PNGs)
    val_patched: ImageList
    counts: dict

    def boxes_of(self, indices) -> np.ndarray:
        """Ground truth, for evaluation only: ``len(indices) x copies x 4`` trigger boxes of these training
        images, all zero for a clean image."""
        indices = np.asarray(indices)
        pos = np.clip(np.searchsorted(self.poison_idx, indices), 0, max(len(self.poison_idx) - 1, 0))
        hit = (self.poison_idx[pos] == indices) if len(self.poison_idx) else np.zeros(len(indices), bool)
        out = np.zeros((len(indices), *self.poison_boxes.shape[1:]), dtype=self.poison_boxes.dtype)
        out[hit] = self.poison_boxes[pos[hit]]
        return out

    def poison_mask(self, n_train: int) -> np.ndarray:
        """Ground truth, for evaluation only: True where a training image carries the trigger."""
        mask = np.zeros(n_train, dtype=bool)
        mask[self.poison_idx] = True
        return mask


def run_attack(params: Params, data: Data, progress: bool = True) -> AttackResult:
    """The cached ``attack`` stage over the data stage's splits (params with a resolved data root)."""
    a = params.attack
    train, val = data.train.images, data.val.images
    target = train.class_index(a.target_class)

    def compute(out: Path, final: Path) -> None:
        trigger = make_trigger(a)
        rng = np.random.default_rng(a.seed)
        members = np.flatnonzero(train.labels == target)
        n_poison = round(a.poison_rate * len(members))
        if n_poison == 0:
            raise AttackError(
                f"attack.poison_rate = {a.poison_rate} of {len(members)} '{a.target_class}' images poisons none"
            )
        poison_idx = np.sort(rng.choice(members, size=n_poison, replace=False))
        # Training poisons are pasted on the original images (sizes read from the file headers).
        sizes = np.array([image_hw(train.paths[i]) for i in poison_idx])
        poison_boxes = sample_boxes(rng, sizes, a, a.train_margin, a.n_copies, "train_margin")
        poisoned_paths = [_out_path(out / "train_poisoned", train, i) for i in poison_idx]
        for size in np.unique(sizes, axis=0):
            group = np.flatnonzero((sizes == size).all(axis=1))
            pixels = torch.from_numpy(
                np.stack([load_rgb(train.paths[poison_idx[g]]).transpose(2, 0, 1) for g in group])
            )
            _save_pngs(
                paste_boxes(pixels, trigger, poison_boxes[group]),
                [poisoned_paths[g] for g in group],
                progress,
                "poison train",
            )

        # The patched validation set: every non-target image, from the evaluation pixels (resized if
        # the profile resizes), with its own stream of random locations.
        val_idx = np.flatnonzero(val.labels != target)
        val_rng = np.random.default_rng([a.seed, 1])
        val_sizes = np.tile(data.val.pixels.shape[2:], (len(val_idx), 1))
        val_boxes = sample_boxes(val_rng, val_sizes, a, a.val_margin, 1, "val_margin")
        patched_paths = [_out_path(out / "val_patched", val, i) for i in val_idx]
        patched = paste_boxes(torch.from_numpy(np.asarray(data.val.pixels[val_idx])), trigger, val_boxes)
        _save_pngs(patched, patched_paths, progress, "patch val")

        io.save_npz(
            out / "recipe.npz",
            poison_idx=poison_idx,
            poison_boxes=poison_boxes,
            val_idx=val_idx,
            val_boxes=val_boxes,
            trigger_source=trigger.source.numpy(),
        )

        def final_path(p: Path) -> str:  # where the file will be once the stage folder is renamed into place
            return str(final / p.relative_to(out))

        train_paths = list(train.paths)
        for i, p in zip(poison_idx, poisoned_paths, strict=True):
            train_paths[i] = final_path(p)
        write_file_list(out / "train_poisoned.txt", ImageList(train_paths, train.labels, train.classes))
        write_file_list(
            out / "val_patched.txt", ImageList([final_path(p) for p in patched_paths], val.labels[val_idx], val.classes)
        )
        side = int(poison_boxes[0, 0, 2])
        Image.fromarray(trigger.at(side).numpy().transpose(1, 2, 0)).save(out / "trigger.png")

        rows = [
            dict(
                train_index=int(i),
                path=train.paths[i],
                poisoned_path=final_path(p),
                copy=c,
                x=int(b[0]),
                y=int(b[1]),
                w=int(b[2]),
                h=int(b[3]),
            )
            for i, p, bs in zip(poison_idx, poisoned_paths, poison_boxes, strict=True)
            for c, b in enumerate(bs)
        ]
        (out / "ground_truth").mkdir()
        pd.DataFrame(rows).to_csv(out / "ground_truth" / "poison_boxes.csv", index=False)
        counts = {
            "train_images": len(train),
            "target_class": a.target_class,
            "target_images": int(len(members)),
            "poisoned_images": int(n_poison),
            "poisoned_fraction_of_target": n_poison / len(members),
            "poisoned_fraction_of_train": n_poison / len(train),
            "triggers_per_poison": a.n_copies,
            "trigger_side_px": side,
            "trigger_area_fraction": side * side / float(sizes[0].prod()),
            "val_images": len(val),
            "val_patched_images": int(len(val_idx)),
        }
        io.write_json(out / "counts.json", counts)

    result = cached_stage("attack", params, compute)
    return load_attack(result.path, data)


def load_attack(path: Path, data: Data) -> AttackResult:
    recipe = np.load(path / "recipe.npz")
    counts = json.loads((path / "counts.json").read_text())
    train, val = data.train.images, data.val.images
    return AttackResult(
        path=path,
        trigger=Trigger(torch.from_numpy(recipe["trigger_source"])),
        target_index=train.class_index(counts["target_class"]),
        target_class=counts["target_class"],
        poison_idx=recipe["poison_idx"],
        poison_boxes=recipe["poison_boxes"],
        val_idx=recipe["val_idx"],
        val_boxes=recipe["val_boxes"],
        train_poisoned=read_file_list(path / "train_poisoned.txt", train.classes),
        val_patched=read_file_list(path / "val_patched.txt", val.classes),
        counts=counts,
    )


def poisoned_train_pixels(data: Data, attack: AttackResult, image_size: int | None = None) -> torch.Tensor:
    """The poisoned training set as a ``N x 3 x H x W`` uint8 tensor, equal to decoding ``train_poisoned``.

    At native size the recipe is applied to the clean cache in memory (one batched paste); where the
    profile resizes images, the poisoned PNGs are decoded with the same resize instead."""
    pixels = data.train.tensor().clone()
    if image_size is None:
        pixels[attack.poison_idx] = paste_boxes(pixels[attack.poison_idx], attack.trigger, attack.poison_boxes)
    else:
        files = [attack.train_poisoned.paths[i] for i in attack.poison_idx]
        pixels[attack.poison_idx] = torch.from_numpy(decode_images(files, image_size, progress=False))
    return pixels


def patched_val_pixels(data: Data, attack: AttackResult) -> torch.Tensor:
    """The patched validation set (non-target images with the trigger), from the recipe in memory."""
    return paste_boxes(data.val.tensor()[attack.val_idx], attack.trigger, attack.val_boxes)
