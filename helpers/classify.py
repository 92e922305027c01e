"""PatchSearch's poison classifier: learn what the top-ranked candidate triggers look like, find them all.

As in the paper and its code (``patch_search_poison_classifier.py``):
- a small ResNet (one BasicBlock per stage) with a 2-way head, trained from scratch with SGD (momentum
  0.9, weight decay 1e-4, cosine schedule), batch 32, at most ``max_iters`` iterations;
- training pool: every image except the top ``exclude_top`` fraction by poison score and the proxy
  validation images; each sample gets, with probability 0.5, a random top-k patch pasted (label 1), else
  label 0; the patch is pasted after the random resized crop (scale 0.2-1) and flip and before colour
  jitter / grayscale, its side uniform in [w/3, 4w/3) of the candidate window w (the paper: 20-80 px for
  w = 60; ``classifier.paste_scale``) and its place random with a margin of ``w/6`` (the paper: 10 px);
  beyond the paper, ``classifier.negative_paste`` gives that share of the label-0 samples a natural patch
  (a window of another image) pasted the same way, so that the classifier must learn what the top-k
  patches show rather than that something square was pasted; ``classifier.exclude_top_clusters`` also
  leaves out of the pool every image of the clusters the top-k candidates come from: where poisons are
  many (a tenth of the set here, 0.5% in the paper) and the search scores few of them, the top 10% leaves
  most poisons in the pool, and half of them are then drawn as clean samples that carry the real trigger;
- proxy validation: the top-k scored images as poisonous, the bottom-k *scored* images (the lowest flip
  counts: evidence of being clean, where an unscored image has none) as clean, no pasting; F1 every
  ``eval_every`` iterations; training stops when ``int(100 * F1)`` has not changed for ``patience``
  evaluations (``EarlyStopping``);
- an ensemble of ``n_models`` classifiers (seeds ``seed + m``) whose logits are averaged; images it
  calls poisonous are removed. (The official code can append a model twice when an epoch ends before the
  iteration budget; here every model is trained and kept exactly once.)

Notebook 06's stage ``classifier_stage`` writes the filtered training list; ``ENSEMBLES`` and
``ensemble_removed`` say what another ensemble rule would remove from the same members' logits.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import io
from .augment import AugmentConfig, BatchAugment
from .cache import resumable_stage
from .cluster import check_variant, cluster_stage, defense_ids, training_set
from .compute import autocast, check_finite, device_for_run, fp32_region
from .data import write_file_list
from .kernels import paste_patches
from .localize import (
    cut_patches,
    localization_baselines,
    window_hits_any,
)
from .models import Normaliser, ResNet
from .params import ClassifierParams, Params
from .search import (
    load_search,
    search_stage,
    top_k_accuracy,
)
from .ssl import augment_config, train_stage


class PoisonNet(nn.Module):
    def __init__(self, width: int = 16, stem: str = "cifar", stem_stride: int = 1) -> None:
        super().__init__()
        self.backbone = ResNet((1, 1, 1, 1), width, stem, stem_stride)
        self.head = nn.Linear(self.backbone.feature_dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class EarlyStopping:
    """Stop when ``int(100 * F1)`` is unchanged for ``patience`` evaluations in a row."""

    def __init__(self, patience: int = 10) -> None:
        self.patience, self.last, self.same = patience, None, 0

    def update(self, f1: float) -> bool:
        value = int(100 * f1)
        self.same = self.same + 1 if value == self.last else 0
        self.last = value
        return self.same >= self.patience


def f1_score(preds: np.ndarray, labels: np.ndarray) -> float:
    tp = int(((preds == 1) & (labels == 1)).sum())
    fp = int(((preds == 1) & (labels == 0)).sum())
    fn = int(((preds == 0) & (labels == 1)).sum())
    return 2 * tp / max(2 * tp + fp + fn, 1)


def paste_random_patches(
    x: torch.Tensor,
    patches: torch.Tensor,
    p: float,
    window: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (1 / 3, 4 / 3),
    negative_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste, with probability ``p`` per image, a random patch resized to a side in
    [scale[0] w, scale[1] w) (the paper: [w/3, 4w/3)) at a random place (margin w/6) on float images in
    [0, 1]; returns the images and the labels (1 = a top-k patch pasted).

    ``negative_p`` (the paper: 0): with this probability an image labelled 0 gets a *natural* patch pasted
    the same way: a ``w x w`` window cut at a random place of another image of the batch, resized and placed
    like the top-k patches. A pasted square then tells the two labels apart no more than its content does."""
    n, _, height, width = x.shape
    labels = (torch.rand(n, generator=generator) < p).long()
    which = torch.randint(len(patches), (n,), generator=generator)
    lo = max(1, round(scale[0] * window))
    hi = max(lo + 1, round(scale[1] * window))
    sides = torch.randint(lo, hi, (n,), generator=generator).clamp(max=min(height, width))
    margin = max(0, round(window / 6))
    u = torch.rand(n, 2, generator=generator)
    room_x = (width - 2 * margin - sides).clamp(min=0)
    room_y = (height - 2 * margin - sides).clamp(min=0)
    xs = (margin + u[:, 0] * (room_x + 1)).floor().long().clamp(max=width - 1)
    ys = (margin + u[:, 1] * (room_y + 1)).floor().long().clamp(max=height - 1)
    idx = torch.nonzero(labels)[:, 0]
    sources = patches[which[idx]].to(x.device).float() / 255
    if negative_p > 0:  # drawn after the rest, so that negative_p = 0 keeps the paper's draws
        natural = torch.nonzero((labels == 0) & (torch.rand(n, generator=generator) < negative_p))[:, 0]
        w = min(window, height, width)
        cx = torch.randint(0, width - w + 1, (n,), generator=generator)[natural]
        cy = torch.randint(0, height - w + 1, (n,), generator=generator)[natural]
        donors = x[(natural + 1) % n]  # the next image of the batch, before anything is pasted
        cut = [d[:, r : r + w, c : c + w] for d, r, c in zip(donors, cy.tolist(), cx.tolist(), strict=True)]
        if cut:
            idx, sources = torch.cat([idx, natural]), torch.cat([sources, torch.stack(cut)])
    if len(idx):
        side_max = int(sides[idx].max())
        resized = torch.zeros(len(idx), x.shape[1], side_max, side_max, dtype=x.dtype, device=x.device)
        for s in sides[idx].unique().tolist():
            sel = torch.nonzero(sides[idx] == s)[:, 0]
            resized[sel, :, :s, :s] = F.interpolate(
                sources[sel], size=(s, s), mode="bilinear", antialias=True, align_corners=False
            )
        x[idx] = paste_patches(x[idx], resized, xs[idx], ys[idx], sizes=sides[idx])
    return x, labels.to(x.device)


@torch.no_grad()
def predict_logits(model: nn.Module, normalise, pixels, batch_size: int = 512, precision: str = "fp32") -> torch.Tensor:
    """Logits (fp32) of uint8 images, the network run in ``precision``."""
    model.eval()
    out = []
    for i in range(0, len(pixels), batch_size):
        with autocast(normalise.device, precision):
            logits = model(normalise(pixels[i : i + batch_size]))
        out.append(logits.float().cpu())
    return torch.cat(out)


def train_classifier(
    pixels: torch.Tensor,
    pool: np.ndarray,
    patches: torch.Tensor,
    window: int,
    val_idx: np.ndarray,
    val_labels: np.ndarray,
    cfg: ClassifierParams,
    mean,
    std,
    seed: int,
    normalise,
    progress: bool = False,
    precision: str = "fp32",
) -> tuple[nn.Module, list[dict]]:
    """One poison classifier; returns the model at the stop and its history (iteration, loss, proxy F1).
    Forward and backward passes run in ``precision``; the loss in fp32."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    device = normalise.device
    size = pixels.shape[-1]
    model = PoisonNet(cfg.width, "cifar" if size <= 64 else "imagenet", cfg.stem_stride).to(device)
    model = model.to(memory_format=torch.channels_last)
    aug = BatchAugment(AugmentConfig(size=size, crop_scale=(cfg.crop_min_scale, 1.0), mean=tuple(mean), std=tuple(std)))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.max_iters)
    stopper = EarlyStopping(cfg.patience)
    val_pixels = pixels[val_idx]
    history, order, cursor = [], torch.zeros(0, dtype=torch.long), 0
    bar = tqdm(range(cfg.max_iters), desc=f"classifier seed {seed}", disable=not progress, leave=False)
    for it in bar:
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.as_tensor(pool)[torch.randperm(len(pool), generator=g)], 0
        batch = order[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        model.train()
        x = aug.geometric(pixels[batch].to(device), g)
        x, labels = paste_random_patches(x, patches, cfg.paste_p, window, g, tuple(cfg.paste_scale), cfg.negative_paste)
        x = aug.photometric(x, g).contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x)
        with fp32_region(device):
            loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.max_iters:  # NaN weights keep the loss NaN after
            keys = {"classifier.lr": cfg.lr, "classifier.weight_decay": cfg.weight_decay}  # the step it began
            check_finite(loss.item(), f"poison classifier seed {seed} at iteration {it + 1}", keys)
        if (it + 1) % cfg.eval_every == 0:
            preds = predict_logits(model, normalise, val_pixels, precision=precision).argmax(1).numpy()
            f1 = f1_score(preds, val_labels)
            history.append({"iteration": it + 1, "loss": float(loss), "proxy_f1": f1})
            bar.set_postfix(loss=f"{float(loss):.3f}", f1=f"{f1:.2f}")
            if stopper.update(f1):
                break
    return model.eval(), history


def proxy_validation(ranking: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ranked images as poisonous (1), bottom-k as clean (0)."""
    idx = np.concatenate([ranking[:k], ranking[-k:]])
    return idx, np.r_[np.ones(k, dtype=np.int64), np.zeros(k, dtype=np.int64)]


def training_pool(
    ranking: np.ndarray,
    exclude_top: float,
    val_idx: np.ndarray,
    ids: np.ndarray | None = None,
    also_drop: np.ndarray | None = None,
) -> np.ndarray:
    """Every image except the top ``exclude_top`` fraction of the ranking, the proxy validation images and
    ``also_drop`` (indices), in the order of their ``ids`` (``cluster.order``; default: index), which the
    classifier's draws follow."""
    n = len(ranking)
    drop = set(ranking[: int(round(exclude_top * n))].tolist()) | set(np.asarray(val_idx).tolist())
    if also_drop is not None:
        drop |= set(np.asarray(also_drop).tolist())
    pool = np.array(sorted(set(range(n)) - drop), dtype=np.int64)
    return pool if ids is None else pool[np.argsort(ids[pool], kind="stable")]


def top_cluster_members(params: Params, variant: str, top: np.ndarray, progress: bool = False) -> np.ndarray:
    """Indices of every image in a cluster that one of the ``top`` candidates belongs to: where the search
    says the trigger is, and so where unscored poisons gather (``classifier.exclude_top_clusters``)."""
    assignment = np.load(cluster_stage(params, variant, progress) / "clustering.npz")["assignment"]
    return np.flatnonzero(np.isin(assignment, assignment[np.asarray(top)]))


def classifier_stage(params: Params, variant: str = "poisoned", progress: bool = True) -> Path:
    """The poison classifier ensemble over the search's top-k patches; writes the filtered and the removed
    training lists (``filtered.txt``, ``removed.txt``) and every image's scores (``scores.csv``). Each member's
    logits are kept in ``<stage key>.partial/`` once it is trained, so a stopped ensemble resumes there."""
    check_variant(variant)
    c = params.classifier
    search_dir = search_stage(params, variant, progress)

    def compute(out: Path, final: Path, work: Path) -> None:
        start = time.perf_counter()
        found = load_search(search_dir)
        pixels, images = training_set(params, variant, progress)
        w, ranking = found["window"], found["ranking"]
        top = ranking[: c.top_k]
        corners = torch.as_tensor(found["corners"][top])
        patches = cut_patches(pixels[torch.as_tensor(top)], corners[:, 0], corners[:, 1], w)
        val_idx, val_labels = proxy_validation(ranking[found["scored"][ranking]], c.top_k)  # among scored images
        also_drop = top_cluster_members(params, variant, top, progress) if c.exclude_top_clusters else None
        pool = training_pool(ranking, c.exclude_top, val_idx, defense_ids(params, pixels), also_drop)
        cfg_ssl = augment_config(params.ssl, pixels.shape[-1])
        normalise = Normaliser(cfg_ssl.mean, cfg_ssl.std, device_for_run())
        logits, histories = [], []
        for m in range(c.n_models):  # each member kept in work/ once trained: a stopped ensemble resumes
            member = work / f"member_{m}.npz"
            if not member.is_file():
                model, history = train_classifier(
                    pixels,
                    pool,
                    patches,
                    w,
                    val_idx,
                    val_labels,
                    c,
                    cfg_ssl.mean,
                    cfg_ssl.std,
                    c.seed + m,
                    normalise,
                    progress,
                    params.compute.precision,
                )
                member_logits = predict_logits(model, normalise, pixels, precision=params.compute.precision).numpy()
                io.save_npz(member, logits=member_logits, history=np.array(json.dumps(history)))
            z = np.load(member)
            histories += [{"model": m, **h} for h in json.loads(str(z["history"]))]
            logits.append(z["logits"])
        logits = np.stack(logits)
        mean_logits = logits.mean(0)
        removed = mean_logits.argmax(1) == 1
        io.save_npz(out / "classifier.npz", logits=logits, removed=removed)
        write_file_list(out / "filtered.txt", images.subset(np.flatnonzero(~removed)))
        write_file_list(out / "removed.txt", images.subset(np.flatnonzero(removed)))
        table = pd.DataFrame(
            {
                "index": np.arange(len(pixels)),
                "path": images.paths,
                "poison_score": found["scores"],
                "scored": found["scored"],
                "classifier_logit": mean_logits[:, 1] - mean_logits[:, 0],
                "removed": removed,
            }
        )
        io.write_text(out / "scores.csv", table.to_csv(index=False))
        io.write_text(out / "history.csv", pd.DataFrame(histories).to_csv(index=False))
        io.write_json(
            out / "summary.json",
            {
                "removed": int(removed.sum()),
                "n": len(removed),
                "pool": len(pool),
                "seconds": time.perf_counter() - start,
            },
        )

    return resumable_stage(f"classifier_{variant}", params, compute).path


def filtered_model_stage(params: Params, icutmix: bool | None = None, progress: bool = True) -> Path:
    """The cached ``ssl_filtered`` stage: the SSL model retrained on the poisoned set minus what the defense
    of ``params.search.method`` removed (with ``icutmix``: the paper's "PatchSearch + i-CutMix")."""
    return train_stage(params, "filtered", icutmix, progress, keep=lambda: kept_indices(params, progress))


def kept_indices(params: Params, progress: bool = False) -> np.ndarray:
    """Indices of the poisoned training set the defense of ``params.search.method`` keeps. The defense
    always inspects the model trained without i-CutMix (``ssl.icutmix`` only changes how the final model
    is retrained on the filtered set: the paper's "PatchSearch + i-CutMix")."""
    params = dataclasses.replace(params, ssl=dataclasses.replace(params.ssl, icutmix=False))
    z = np.load(classifier_stage(params, "poisoned", progress) / "classifier.npz")
    return np.flatnonzero(~z["removed"])


def detection_metrics(
    found: dict, removed: np.ndarray, poison: np.ndarray, boxes: np.ndarray, image_size: int, k: int = 20
) -> dict:
    """A row of the paper's Table 1 (ground truth: for evaluation only): top-k accuracy of the search's
    ranking, recall, precision and total of the classifier's removals, and how often the candidate window
    of a scored poisoned image hits its trigger, beside how often a window of the same side at the image
    centre, or at a random place, would (``localize.localization_baselines``). ``boxes``: ``N x >=3`` or
    ``N x copies x >=3`` (an image with several triggers is hit when any of them is): the true boxes of the
    scored poisons (``np.flatnonzero(found["scored"] & poison)``, in that order)."""
    scored_poisons = np.flatnonzero(found["scored"] & poison)
    corners = found["corners"][scored_poisons]
    w = found["window"]
    hits = window_hits_any(corners[:, 0], corners[:, 1], w, boxes)
    baselines = localization_baselines(boxes, w, image_size)
    return {
        "poisons": int(poison.sum()),
        "w": found["window"],
        f"top-{k} acc (%)": 100 * top_k_accuracy(found["ranking"], poison, k),
        "recall (%)": 100 * (removed & poison).sum() / poison.sum(),
        "precision (%)": 100 * (removed & poison).sum() / max(removed.sum(), 1),
        "total removed": int(removed.sum()),
        "clean removed (%)": 100 * (removed & ~poison).sum() / max((~poison).sum(), 1),
        "trigger hit, scored poisons (%)": 100 * hits.mean() if len(hits) else float("nan"),
        **{f"{name} window hit (%)": 100 * rate for name, rate in baselines.items()},
    }


# How the ensemble's five members decide together. "mean" is the paper's and the official code's (average the
# members' logits, take the argmax); "unanimous" removes an image only where every member calls it poison. The
# members differ only in their seed: an image that some of them call clean is one whose "poison" verdict rests
# on the training draw, and on the poisoned set those are mostly clean images (06_false_removals.md).
ENSEMBLES = ("mean", "unanimous")


def cluster_vote(removed: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """The removals the defense's own clusters second: an image stays removed only where the ensemble removes
    more than half of its k-means cluster (``clustering.npz``'s ``assignment``, the clusters the search ran on).
    Not the paper's. The poisons gather in a few clusters that the classifier removes almost whole; its false
    removals are scattered over clusters it mostly keeps. A poison in a cluster of clean images is kept."""
    counts = np.bincount(assignment)
    share = np.bincount(assignment, weights=removed.astype(float), minlength=len(counts)) / np.maximum(counts, 1)
    return removed & (share[assignment] > 0.5)


def ensemble_removed(logits: np.ndarray, rule: str) -> np.ndarray:
    """Which images an ensemble removes, from its members' ``M x N x 2`` logits (``classifier.npz``)."""
    margins = logits[..., 1] - logits[..., 0]  # > 0: that member calls the image poison
    if rule == "mean":
        return margins.mean(0) > 0
    if rule == "unanimous":
        return (margins > 0).all(0)
    raise ValueError(f"unknown ensemble rule {rule!r} (known: {', '.join(ENSEMBLES)})")
