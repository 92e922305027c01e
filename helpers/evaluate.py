"""Evaluation protocol of the papers: frozen features, a linear probe with few labels (seeded subsets,
several seeds, mean and std), kNN as a cheap extra, and the attack metrics on clean and patched data.

- Acc: accuracy on the clean validation set; on the patched set, accuracy on the patched non-target images.
- FP: non-target images predicted as the target category.
- ASR = FP / number of non-target images (PatchSearch: FP * 100 / 4950 on ImageNet-100).

The linear probe is trained full-batch on features computed once without augmentation (a logistic
regression): on a CPU this replaces the papers' probe trained for epochs on augmented images.

``evaluate_model_stage`` measures any other trained backbone the same way (notebook 08's models:
distilled students, i-CutMix variants, the clean set retrained after a defense).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import io
from .attack import patched_val_pixels, run_attack
from .cache import cached_stage
from .compute import TrainingDiverged, check_finite
from .data import load_data, write_file_list
from .models import extract_features
from .params import Params
from .ssl import augment_config, load_backbone, train_stage


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
        if not torch.isfinite(x).all():
            raise TrainingDiverged(
                "linear probe: the frozen features are not finite (the backbone holds NaN or inf): its SSL "
                "training diverged or its file is damaged"
            )
        for _ in range(self.epochs):
            opt.zero_grad()
            loss = F.cross_entropy(self.layer(x), y)
            loss.backward()
            opt.step()
            sched.step()
        keys = {"eval.probe_lr": self.lr, "eval.probe_weight_decay": self.wd}
        check_finite(loss.item(), f"linear probe seed {self.seed}", keys)
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


def evaluate_stage(params, variant: str, icutmix: bool = False, progress: bool = True):
    """The cached ``eval_*`` stage of one trained model: features of the training, validation and patched
    sets, linear-probe rows for every label fraction and seed, kNN metrics and the confusion matrices.

    Returns ``(folder, probe table, knn table)``. The label subsets are written as SSL-Backdoor file lists
    (``labels_<fraction>_seed<k>.txt``) so other code can use the same ones."""
    params = dataclasses.replace(params, ssl=dataclasses.replace(params.ssl, icutmix=icutmix))
    e = params.eval

    def compute(out, final):
        if variant == "filtered":  # only on a miss: a result needs no model
            from .classify import filtered_model_stage

            model_dir = filtered_model_stage(params, progress=progress)
        else:
            model_dir = train_stage(params, variant, progress=progress)
        data = load_data(params, progress=progress)
        attack = run_attack(params, data, progress=progress)
        image_size = data.train.pixels.shape[-1]
        backbone = load_backbone(params, model_dir, image_size)
        cfg = augment_config(params.ssl, image_size)
        sets = {"train": data.train.pixels, "val": data.val.pixels, "patched": patched_val_pixels(data, attack)}
        feats = {
            k: extract_features(
                backbone, v, cfg.mean, cfg.std, e.batch_size, progress, f"features {k}", params.compute.precision
            )
            for k, v in sets.items()
        }
        np.savez(out / "features.npz", **feats)
        labels = {"train": data.train.labels, "val": data.val.labels, "patched": data.val.labels[attack.val_idx]}
        n_classes, target = len(data.train.classes), attack.target_index
        rows = probe_rows(
            feats["train"],
            labels["train"],
            feats["val"],
            labels["val"],
            feats["patched"],
            labels["patched"],
            target,
            n_classes,
            e.label_fractions,
            e.probe_seeds,
            e.probe_epochs,
            e.probe_lr,
            e.probe_weight_decay,
            e.seed,
        )
        for fraction in e.label_fractions:
            for s in range(e.probe_seeds):
                subset = label_subset(labels["train"], fraction, e.seed + s)
                write_file_list(out / f"labels_{fraction:g}_seed{e.seed + s}.txt", data.train.images.subset(subset))
        io.write_text(out / "probe.csv", pd.DataFrame(rows).to_csv(index=False))
        knn = {}
        for name in ("val", "patched"):
            preds = knn_predict(feats["train"], labels["train"], feats[name], n_classes, e.knn_k, e.knn_temperature)
            knn[name] = attack_metrics(preds, labels[name], target)
            np.save(out / f"knn_confusion_{name}.npy", confusion_matrix(preds, labels[name], n_classes))
        probe = LinearProbe(n_classes, e.probe_epochs, e.probe_lr, e.probe_weight_decay, e.seed)
        subset = label_subset(labels["train"], max(e.label_fractions), e.seed)
        probe.fit(feats["train"][subset], labels["train"][subset])
        for name in ("val", "patched"):
            cm = confusion_matrix(probe.predict(feats[name]), labels[name], n_classes)
            np.save(out / f"probe_confusion_{name}.npy", cm)
        io.write_json(out / "knn.json", knn)

    stage = f"eval_{variant}"
    result = cached_stage(stage, params, compute)
    probe_table = pd.read_csv(result.path / "probe.csv")
    knn = json.loads((result.path / "knn.json").read_text())
    return result.path, probe_table, knn


def table2_row(name: str, probe_table, knn: dict, fraction: float) -> dict:
    """A row of the paper's Table 2: mean (std) over seeds of the probe with ``fraction`` of the labels."""
    t = probe_table[np.isclose(probe_table["labels"], fraction)]

    def mean_std(col, scale=1.0, digits=1):
        return f"{t[col].mean() * scale:.{digits}f} ± {t[col].std(ddof=0) * scale:.{digits}f}"

    return {
        "model": name,
        "labels": f"{fraction:.0%}",
        "clean acc (%)": mean_std("clean_acc", 100),
        "clean FP": mean_std("clean_fp", 1, 0),
        "patched acc (%)": mean_std("patched_acc", 100),
        "patched FP": mean_std("patched_fp", 1, 0),
        "ASR (%)": mean_std("asr", 100),
        "kNN acc (%)": f"{knn['val']['acc'] * 100:.1f}",
        "kNN ASR (%)": f"{knn['patched']['asr'] * 100:.1f}",
    }


def evaluate_model_stage(stage: str, params: Params, model_dir: Callable[[], Path], progress: bool = True):
    """The cached ``stage`` (an ``eval_*`` entry of ``STAGE_INPUTS``) of the backbone in the folder that
    ``model_dir()`` returns (``backbone.safetensors`` of ``params.ssl``'s architecture; the model's own
    cached stage), called only when the evaluation is not cached: a shipped evaluation needs no model.
    Returns ``(folder, probe table, knn table)`` like ``evaluate_stage``."""
    e = params.eval

    def compute(out: Path, final: Path) -> None:
        data = load_data(params, progress=progress)
        attack = run_attack(params, data, progress=progress)
        image_size = data.train.pixels.shape[-1]
        backbone = load_backbone(params, model_dir(), image_size)
        cfg = augment_config(params.ssl, image_size)
        sets = {"train": data.train.pixels, "val": data.val.pixels, "patched": patched_val_pixels(data, attack)}
        feats = {
            k: extract_features(backbone, v, cfg.mean, cfg.std, e.batch_size, progress, k, params.compute.precision)
            for k, v in sets.items()
        }
        labels = {"train": data.train.labels, "val": data.val.labels, "patched": data.val.labels[attack.val_idx]}
        n_classes, target = len(data.train.classes), attack.target_index
        rows = probe_rows(
            *(feats["train"], labels["train"], feats["val"], labels["val"], feats["patched"], labels["patched"]),
            *(target, n_classes, e.label_fractions, e.probe_seeds, e.probe_epochs, e.probe_lr),
            *(e.probe_weight_decay, e.seed),
        )
        io.write_text(out / "probe.csv", pd.DataFrame(rows).to_csv(index=False))
        knn = {
            name: attack_metrics(
                knn_predict(feats["train"], labels["train"], feats[name], n_classes, e.knn_k, e.knn_temperature),
                labels[name],
                target,
            )
            for name in ("val", "patched")
        }
        io.write_json(out / "knn.json", knn)

    result = cached_stage(stage, params, compute)
    return result.path, pd.read_csv(result.path / "probe.csv"), json.loads((result.path / "knn.json").read_text())


def mean_row(probe_table: pd.DataFrame, fraction: float) -> dict:
    """Mean over the probe seeds of one label fraction: accuracy (%), FP (images) and ASR (%)."""
    t = probe_table[np.isclose(probe_table["labels"], fraction)]
    return {
        "clean acc (%)": 100 * t["clean_acc"].mean(),
        "clean FP": t["clean_fp"].mean(),
        "patched acc (%)": 100 * t["patched_acc"].mean(),
        "patched FP": t["patched_fp"].mean(),
        "ASR (%)": 100 * t["asr"].mean(),
    }


# A backdoor counts as planted when the patched-data ASR of the linear probe is at least ``PLANTED_ASR`` and at
# least ``PLANTED_FACTOR`` times the clean model's ASR on the same patched images: the project's rule (notebooks
# 02 and 07, ``helpers.studies``), chosen so that neither a high base rate nor a small absolute rise counts.
PLANTED_ASR, PLANTED_FACTOR = 0.2, 4


def backdoor_planted(asr: float, clean_asr: float) -> bool:
    """Whether a model's ASR (a share) shows a backdoor, against the clean model's on the same patched data."""
    return bool(asr >= PLANTED_ASR and asr >= PLANTED_FACTOR * clean_asr)


def planted_rule() -> str:
    """The planted rule in words, from its constants."""
    return f"an ASR of at least {PLANTED_ASR:.0%} and at least {PLANTED_FACTOR}x the clean model's"


def goal_checks(asr: float, clean_asr: float, acc: float, clean_acc: float, rich_share: float) -> dict[str, bool]:
    """The study's goal for one run, part by part (fractions, not %): the 10%-label probe's ASR at least 20%
    and at least 5x the clean model's, clean accuracy within 3 points of the clean model's, and at least
    half of the poisons in clusters at least half poisoned."""
    return {
        "ASR >= 20%": asr >= 0.2,
        "ASR >= 5x the clean model's": asr >= 5 * clean_asr,
        "accuracy within 3 points of the clean model's": clean_acc - acc <= 0.03,
        ">= 50% of the poisons in rich clusters": rich_share >= 0.5,
    }
