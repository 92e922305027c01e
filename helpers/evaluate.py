"""Evaluation protocol of the papers: frozen features, a linear probe with few labels (seeded subsets,
several seeds, mean and std), kNN as a cheap extra, and the attack metrics on clean and patched data.

- Acc: accuracy on the clean validation set; on the patched set, accuracy on the patched non-target images.
- FP: non-target images predicted as the target category.
- ASR = FP / number of non-target images (PatchSearch: FP * 100 / 4950 on ImageNet-100).

The linear probe is trained full-batch on features computed once without augmentation (a logistic
regression): on a CPU this replaces the papers' probe trained for epochs on augmented images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def extract_features(
    backbone: torch.nn.Module, pixels, mean, std, batch_size: int = 512, progress: bool = False, desc: str = "features"
) -> np.ndarray:
    """Backbone features of uint8 ``N x 3 x H x W`` images (eval mode, no augmentation)."""
    device = next(backbone.parameters()).device
    backbone.eval()
    mean_t = torch.tensor(mean, device=device)[:, None, None]
    std_t = torch.tensor(std, device=device)[:, None, None]
    out = []
    for start in tqdm(range(0, len(pixels), batch_size), desc=desc, disable=not progress, leave=False):
        batch = torch.as_tensor(np.asarray(pixels[start : start + batch_size])).to(device)
        x = ((batch.float() / 255 - mean_t) / std_t).contiguous(memory_format=torch.channels_last)
        out.append(backbone(x).float().cpu())
    return torch.cat(out).numpy()


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, class-balanced labelled subset: round(fraction * n_c) per class (>= 1)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        chosen.append(rng.choice(members, size=max(1, round(fraction * len(members))), replace=False))
    return np.sort(np.concatenate(chosen))


def knn_predict(
    train_features,
    train_labels,
    test_features,
    n_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> np.ndarray:
    """Weighted kNN on cosine similarity (InstDisc): votes exp(sim / T) of the k nearest training images."""
    train = F.normalize(torch.as_tensor(train_features, dtype=torch.float32), dim=1)
    labels = torch.as_tensor(train_labels)
    preds = []
    for start in range(0, len(test_features), chunk):
        test = F.normalize(torch.as_tensor(test_features[start : start + chunk], dtype=torch.float32), dim=1)
        sim, idx = (test @ train.T).topk(min(k, len(train)), dim=1)
        votes = torch.zeros(len(test), n_classes).scatter_add_(1, labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds).numpy()


class LinearProbe:
    """Logistic regression on standardised frozen features, trained full batch with Adam."""

    def __init__(
        self, n_classes: int, epochs: int = 200, lr: float = 0.1, weight_decay: float = 1e-4, seed: int = 0
    ) -> None:
        self.n_classes, self.epochs, self.lr, self.wd, self.seed = n_classes, epochs, lr, weight_decay, seed

    def fit(self, features: np.ndarray, labels: np.ndarray) -> LinearProbe:
        x = torch.as_tensor(features, dtype=torch.float32)
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        x = (x - self.mean) / self.std
        y = torch.as_tensor(labels)
        torch.manual_seed(self.seed)
        self.layer = torch.nn.Linear(x.shape[1], self.n_classes)
        opt = torch.optim.Adam(self.layer.parameters(), lr=self.lr, weight_decay=self.wd)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.epochs)
        for _ in range(self.epochs):
            opt.zero_grad()
            F.cross_entropy(self.layer(x), y).backward()
            opt.step()
            sched.step()
        return self

    @torch.no_grad()
    def predict(self, features: np.ndarray) -> np.ndarray:
        x = (torch.as_tensor(features, dtype=torch.float32) - self.mean) / self.std
        return self.layer(x).argmax(1).numpy()


def attack_metrics(preds: np.ndarray, labels: np.ndarray, target: int) -> dict:
    """Acc over all given images; FP = non-target images predicted as the target; ASR = FP / non-target."""
    non_target = labels != target
    fp = int((preds[non_target] == target).sum())
    return {"acc": float((preds == labels).mean()), "fp": fp, "asr": fp / max(int(non_target.sum()), 1)}


def confusion_matrix(preds: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(labels * n_classes + preds, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def probe_rows(
    train_features,
    train_labels,
    val_features,
    val_labels,
    patched_features,
    patched_labels,
    target: int,
    n_classes: int,
    fractions,
    seeds: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    base_seed: int = 0,
) -> list[dict]:
    """One row per (label fraction, seed): clean and patched Acc / FP / ASR of a linear probe."""
    rows = []
    for fraction in fractions:
        for s in range(seeds):
            subset = label_subset(train_labels, fraction, base_seed + s)
            probe = LinearProbe(n_classes, epochs, lr, weight_decay, seed=base_seed + s)
            probe.fit(train_features[subset], train_labels[subset])
            clean = attack_metrics(probe.predict(val_features), val_labels, target)
            patched = attack_metrics(probe.predict(patched_features), patched_labels, target)
            rows.append(
                {
                    "labels": fraction,
                    "seed": base_seed + s,
                    "clean_acc": clean["acc"],
                    "clean_fp": clean["fp"],
                    "patched_acc": patched["acc"],
                    "patched_fp": patched["fp"],
                    "asr": patched["asr"],
                }
            )
    return rows
