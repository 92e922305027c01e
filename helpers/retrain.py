"""The cost of defending a set that was never poisoned (PatchSearch paper, Table 10, its second half): SSL
retrained on the clean training set minus what a defense removed from it, to compare with the model
trained on all of it. A defender does not know whether there is an attack, so this is the price paid when
there is none.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from .cache import resumable_stage
from .classify import classifier_stage
from .data import load_data
from .params import Params
from .ssl import train_ssl, write_model


def clean_kept(params: Params, progress: bool = False) -> np.ndarray:
    """Indices of the clean training set that the defense of ``params.search.method`` keeps (the defense
    inspects the clean model trained without i-CutMix, as on the poisoned set)."""
    params = dataclasses.replace(params, ssl=dataclasses.replace(params.ssl, icutmix=False))
    z = np.load(classifier_stage(params, "clean", progress) / "classifier.npz")
    return np.flatnonzero(~z["removed"])


def retrain_clean_stage(params: Params, progress: bool = True) -> Path:
    """The cached ``ssl_clean_filtered`` stage: the profile's SSL method trained on the clean set minus
    what the defense removed (``backbone.safetensors``, ``kept.npy``, the history). Resumable."""
    params = dataclasses.replace(params, ssl=dataclasses.replace(params.ssl, icutmix=False))
    kept = clean_kept(params, progress)
    c = params.compute

    def compute(out: Path, final: Path, work: Path) -> None:
        if c.threads:
            torch.set_num_threads(c.threads)
        pixels = load_data(params, progress=progress).train.tensor()[torch.as_tensor(kept)]
        model, history = train_ssl(pixels, params.ssl, work, progress, precision=c.ssl_precision, compile=c.compile)
        write_model(out, model.backbone, history, c.ssl_precision)
        np.save(out / "kept.npy", kept)

    return resumable_stage("ssl_clean_filtered", params, compute).path
