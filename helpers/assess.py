"""Evaluation of any trained backbone as a cached stage: notebook 08's models (distilled students, i-CutMix
variants, the clean set retrained after a defense) are measured as ``helpers.evaluate.evaluate_stage``
measures the SSL models: linear probes on the profile's label fractions and seeds, and kNN, on the clean
validation set and on its patched copy (accuracy, false positives of the target category, ASR).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from . import io
from .attack import patched_val_pixels, run_attack
from .cache import cached_stage
from .data import load_data
from .evaluate import attack_metrics, extract_features, knn_predict, probe_rows
from .params import Params
from .train import augment_config, load_backbone


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
