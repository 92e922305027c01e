"""Finetuning as a defense (PatchSearch paper, Table 4): the downstream labels are clean, so instead of a
linear probe on frozen features the whole backbone is trained with a linear head on them. Does the trigger
survive? The paper: finetuning lowers the backdoored model's FP from 1708 to 685 (ViT-B), not to the clean
level, and PatchSearch + i-CutMix + finetuning is best.

Each label fraction of the profile (``eval.label_fractions``) is finetuned on the probe's first
``finetune.seeds`` label subsets (the same images as the linear probe's seeds), with random resized crops
(scale 0.5-1) and flips, SGD with momentum and a cosine schedule, in the profile's network precision.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import io
from .attack import patched_val_pixels, run_attack
from .augment import BatchAugment
from .cache import cached_stage
from .classify import filtered_model_stage
from .compute import autocast, check_finite, device_for_run, resolve_precision
from .data import load_data
from .evaluate import attack_metrics, label_subset
from .params import FinetuneParams, Params
from .search import with_method
from .ssl import augment_config, load_backbone, train_stage

VARIANTS = ("clean", "poisoned", "filtered")


def finetune(
    backbone: nn.Module,
    pixels: torch.Tensor,
    labels: np.ndarray,
    n_classes: int,
    f: FinetuneParams,
    augment: BatchAugment,
    seed: int,
    precision: str = "fp32",
    progress: bool = False,
) -> nn.Module:
    """Train ``backbone`` and a new linear head on uint8 ``pixels`` with ``labels``; returns the network
    (backbone then head) in eval mode."""
    device = device_for_run()
    precision = resolve_precision(precision, device)
    torch.manual_seed(seed)
    net = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, n_classes)).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=f.lr, momentum=0.9, weight_decay=f.weight_decay)
    y = torch.as_tensor(labels, dtype=torch.long)
    steps = math.ceil(len(pixels) / f.batch_size)
    total, g = f.epochs * steps, torch.Generator().manual_seed(seed)
    net.train()
    for epoch in tqdm(range(f.epochs), desc="finetune", disable=not progress, leave=False):
        order = torch.randperm(len(pixels), generator=g)
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = f.lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps + step) / total))
            idx = order[step * f.batch_size : (step + 1) * f.batch_size]
            x = augment(pixels[idx].to(device), g)
            with autocast(device, precision):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        keys = {"finetune.lr": f.lr, "finetune.weight_decay": f.weight_decay}  # NaN weights stay NaN: once an epoch
        check_finite(loss.item(), f"finetune seed {seed} at epoch {epoch + 1}", keys)
    return net.eval()


@torch.no_grad()
def predict(net: nn.Module, pixels: torch.Tensor, mean, std, batch_size: int = 512, precision: str = "fp32"):
    device = next(net.parameters()).device
    mean_t = torch.tensor(mean, device=device)[:, None, None]
    std_t = torch.tensor(std, device=device)[:, None, None]
    out = []
    for start in range(0, len(pixels), batch_size):
        x = (pixels[start : start + batch_size].to(device).float() / 255 - mean_t) / std_t
        with autocast(device, resolve_precision(precision, device)):
            out.append(net(x).float().argmax(1).cpu())
    return torch.cat(out).numpy()


def model_stage(params: Params, variant: str, icutmix: bool, progress: bool) -> Path:
    if variant == "filtered":  # the model retrained on the list of params.search.method's defense
        return filtered_model_stage(with_method(params, params.search.method), icutmix, progress)
    return train_stage(params, variant, icutmix, progress)


def finetune_stage(params: Params, variant: str, icutmix: bool = False, progress: bool = True):
    """The cached ``finetune_<variant>`` stage of the model ``eval_<variant>`` evaluates: one row per
    (label fraction, seed) with clean and patched Acc / FP / ASR (``finetune.csv``, the columns of the
    probe's ``probe.csv``). Returns ``(folder, table)``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    params = dataclasses.replace(params, ssl=dataclasses.replace(params.ssl, icutmix=icutmix))
    model_dir = model_stage(params, variant, icutmix, progress)
    e, f = params.eval, params.finetune

    def compute(out: Path, final: Path) -> None:
        if params.compute.threads:
            torch.set_num_threads(params.compute.threads)
        data = load_data(params, progress=progress)
        attack = run_attack(params, data, progress=progress)
        train, labels = data.train.tensor(), data.train.labels
        size = train.shape[-1]
        cfg = dataclasses.replace(augment_config(params.ssl, size), crop_scale=(0.5, 1.0), jitter_p=0.0, gray_p=0.0)
        patched, patched_labels = patched_val_pixels(data, attack), data.val.labels[attack.val_idx]
        rows = []
        for fraction in e.label_fractions:
            for s in range(f.seeds):
                subset = label_subset(labels, fraction, e.seed + s)  # the linear probe's subset of this seed
                net = finetune(
                    load_backbone(params, model_dir, size),
                    *(train[torch.as_tensor(subset)], labels[subset], len(data.train.classes), f, BatchAugment(cfg)),
                    *(f.seed + s, params.compute.precision, progress),
                )
                target = attack.target_index
                clean = attack_metrics(predict(net, data.val.tensor(), cfg.mean, cfg.std), data.val.labels, target)
                hit = attack_metrics(predict(net, patched, cfg.mean, cfg.std), patched_labels, target)
                rows.append(
                    {
                        "labels": fraction,
                        "seed": e.seed + s,
                        "clean_acc": clean["acc"],
                        "clean_fp": clean["fp"],
                        "patched_acc": hit["acc"],
                        "patched_fp": hit["fp"],
                        "asr": hit["asr"],
                    }
                )
        io.write_text(out / "finetune.csv", pd.DataFrame(rows).to_csv(index=False))

    result = cached_stage(f"finetune_{variant}", params, compute)
    return result.path, pd.read_csv(result.path / "finetune.csv")
