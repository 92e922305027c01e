"""PatchSearch's poison classifier: learn what the top-ranked candidate triggers look like, find them all.

As in the paper and its code (``patch_search_poison_classifier.py``):
- a small ResNet (one BasicBlock per stage) with a 2-way head, trained from scratch with SGD (momentum
  0.9, weight decay 1e-4, cosine schedule), batch 32, at most ``max_iters`` iterations;
- training pool: every image except the top ``exclude_top`` fraction by poison score and the proxy
  validation images; each sample gets, with probability 0.5, a random top-k patch pasted (label 1), else
  label 0; the patch is pasted after the random resized crop (scale 0.2-1) and flip and before colour
  jitter / grayscale, its side uniform in [w/3, 4w/3) of the candidate window w (the paper: 20-80 px for
  w = 60; ``classifier.paste_scale``) and its place random with a margin of ``w/6`` (the paper: 10 px);
- proxy validation: the top-k scored images as poisonous, the bottom-k *scored* images (the lowest flip
  counts: evidence of being clean, where an unscored image has none) as clean, no pasting; F1 every
  ``eval_every`` iterations; training stops when ``int(100 * F1)`` has not changed for ``patience``
  evaluations (``EarlyStopping``);
- an ensemble of ``n_models`` classifiers (seeds ``seed + m``) whose logits are averaged; images it
  calls poisonous are removed. (The official code can append a model twice when an epoch ends before the
  iteration budget; here every model is trained and kept exactly once.)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .augment import AugmentConfig, BatchAugment
from .compute import autocast, check_finite, fp32_region
from .kernels import paste_patches
from .models import ResNet
from .params import ClassifierParams


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste, with probability ``p`` per image, a random patch resized to a side in
    [scale[0] w, scale[1] w) (the paper: [w/3, 4w/3)) at a random place (margin w/6) on float images in
    [0, 1]; returns the images and the labels (1 = pasted)."""
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
    if len(idx):
        side_max = int(sides[idx].max())
        resized = torch.zeros(len(idx), x.shape[1], side_max, side_max, dtype=x.dtype, device=x.device)
        for s in sides[idx].unique().tolist():
            sel = torch.nonzero(sides[idx] == s)[:, 0]
            src = patches[which[idx[sel]]].to(x.device).float() / 255
            resized[sel, :, :s, :s] = F.interpolate(
                src, size=(s, s), mode="bilinear", antialias=True, align_corners=False
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
        x, labels = paste_random_patches(x, patches, cfg.paste_p, window, g, tuple(cfg.paste_scale))
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
    ranking: np.ndarray, exclude_top: float, val_idx: np.ndarray, ids: np.ndarray | None = None
) -> np.ndarray:
    """Every image except the top ``exclude_top`` fraction of the ranking and the proxy validation images,
    in the order of their ``ids`` (``cluster.order``; default: index), which the classifier's draws follow."""
    n = len(ranking)
    drop = set(ranking[: int(round(exclude_top * n))].tolist()) | set(np.asarray(val_idx).tolist())
    pool = np.array(sorted(set(range(n)) - drop), dtype=np.int64)
    return pool if ids is None else pool[np.argsort(ids[pool], kind="stable")]
