"""What makes i-CutMix a defense (PatchSearch paper, Table 8), and how often its box meets the trigger.

i-CutMix has two parts: the box pasted into each query view holds a crop of *another image* of the batch,
and the loss is *weighted*: lambda times the loss towards the image's own key plus (1 - lambda) times the
loss towards the partner's key (lambda = the share of the view left unmixed). The ablation swaps one part
at a time (``mix`` section of the params):

- ``fill``: ``crop`` (i-CutMix), ``black`` (a black box: CutOut) or ``noise`` (Gaussian noise in the
  normalised image, as torchvision's RandomErasing with ``value='random'``: RandomErase);
- ``loss``: ``weighted`` (i-CutMix) or ``onehot`` (the own key alone, lambda = 1).

The box and lambda are drawn exactly as in ``helpers.ssl.icutmix`` (one box per batch), so ``crop`` +
``weighted`` trains the same weights as the profile's i-CutMix model. Implemented for MoCo-v2.

``trigger_coverage`` measures, on the training set's own augmented views, how often the box hides a
trigger and how often it pastes a trigger into another image (ground truth: for the analysis only).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .attack import poisoned_train_pixels, run_attack
from .augment import BatchAugment
from .cache import resumable_stage
from .data import load_data
from .params import Params, SSLParams
from .ssl import augment_config, build_model, cutmix_box, train_ssl, write_model

FILLS = ("crop", "black", "noise")
LOSSES = ("weighted", "onehot")


def mix_batch(x: torch.Tensor, fill: str, generator: torch.Generator, mean, std):
    """Paste one box into every image of ``x`` (normalised views): ``(mixed, perm, lambda)``. ``perm`` pairs
    each image with the partner whose crop ``crop`` pastes (and whose key the weighted loss uses)."""
    if fill not in FILLS:
        raise ValueError(f"mix.fill must be one of {', '.join(FILLS)}, got {fill!r}")
    perm = torch.randperm(len(x), generator=generator).to(x.device)  # the draws of helpers.ssl.icutmix
    (y1, y2, x1, x2), lam = cutmix_box(x.shape[2], x.shape[3], generator)
    mixed = x.clone()
    if fill == "crop":
        mixed[:, :, y1:y2, x1:x2] = x[perm][:, :, y1:y2, x1:x2]
    elif fill == "black":  # pixel value 0, normalised
        black = -torch.as_tensor(mean, dtype=x.dtype) / torch.as_tensor(std, dtype=x.dtype)
        mixed[:, :, y1:y2, x1:x2] = black.to(x.device)[:, None, None]
    else:
        noise = torch.randn((len(x), x.shape[1], y2 - y1, x2 - x1), generator=generator)
        mixed[:, :, y1:y2, x1:x2] = noise.to(x.device, x.dtype)
    return mixed, perm, lam


class Mixer:
    """What MoCo-v2 mixes its query views with (``helpers.ssl.MoCoV2.mix``): ``mix_batch`` with ``fill``, and
    the loss's weight of the own key: i-CutMix's ``lambda`` (``weighted``) or 1 (``onehot``: the own key is
    the only positive)."""

    def __init__(self, fill: str, loss: str, mean, std) -> None:
        if fill not in FILLS:
            raise ValueError(f"mix.fill must be one of {', '.join(FILLS)}, got {fill!r}")
        if loss not in LOSSES:
            raise ValueError(f"mix.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.fill, self.loss, self.mean, self.std = fill, loss, mean, std

    def __call__(self, x: torch.Tensor, generator: torch.Generator):
        mixed, perm, lam = mix_batch(x, self.fill, generator, self.mean, self.std)
        return mixed, perm, 1.0 if self.loss == "onehot" else lam


def mixed_model(p: SSLParams, image_size: int, fill: str, loss: str) -> nn.Module:
    """The profile's MoCo-v2, mixing its query views with ``fill`` and weighing its loss by ``loss``."""
    if p.method != "mocov2":
        raise ValueError(f"the i-CutMix ablation (mix section) is implemented for ssl.method mocov2, got {p.method!r}")
    cfg = augment_config(p, image_size)
    mixer = Mixer(fill, loss, cfg.mean, cfg.std)
    torch.manual_seed(p.seed)  # the initial weights, as helpers.ssl.train_ssl draws them
    model = build_model(p, image_size)
    model.mix = mixer
    return model


def with_mix(params: Params, fill: str, loss: str) -> Params:
    return dataclasses.replace(
        params,
        ssl=dataclasses.replace(params.ssl, icutmix=True),
        mix=dataclasses.replace(params.mix, fill=fill, loss=loss),
    )


def mix_stage(params: Params, progress: bool = True) -> Path:
    """The cached ``ssl_mix`` stage: MoCo-v2 trained on the poisoned set with ``params.mix``'s box and loss
    (``backbone.safetensors``, ``history.json`` / ``.csv``, as ``ssl_*`` stages). Resumable."""
    params = with_mix(params, params.mix.fill, params.mix.loss)
    c = params.compute

    def compute(out: Path, final: Path, work: Path) -> None:
        if c.threads:
            torch.set_num_threads(c.threads)
        data = load_data(params, progress=progress)
        pixels = poisoned_train_pixels(data, run_attack(params, data, progress), params.data.image_size)
        model = mixed_model(params.ssl, pixels.shape[-1], params.mix.fill, params.mix.loss)
        desc = f"{params.mix.fill} + {params.mix.loss}"
        _, history = train_ssl(pixels, params.ssl, work, progress, precision=c.ssl_precision, model=model, desc=desc)
        write_model(out, model.backbone, history, c.ssl_precision)

    return resumable_stage("ssl_mix", params, compute).path


def trigger_masks(n: int, boxes: np.ndarray, idx: np.ndarray, size: int) -> torch.Tensor:
    """``n x 1 x size x size`` uint8 masks, 255 inside the trigger boxes ``(x, y, w, h)`` of images ``idx``."""
    masks = torch.zeros((n, 1, size, size), dtype=torch.uint8)
    for i, image_boxes in zip(idx, boxes, strict=True):
        for x, y, w, h in image_boxes[:, :4]:
            masks[i, 0, y : y + h, x : x + w] = 255
    return masks


@torch.no_grad()
def trigger_coverage(masks: torch.Tensor, p: SSLParams, trigger_area: float, batches: int = 40, seed: int = 0) -> dict:
    """Replay the training's crops and i-CutMix boxes on trigger masks (``trigger_masks``): per query view,
    the trigger area in the view before mixing, what the box covers of it, and what it pastes in from the
    partner. Returns shares over the views that show a trigger (own) and over all views (pasted in); a
    view "gets a trigger" when at least a quarter of ``trigger_area`` (one trigger, in pixels) is pasted in."""
    aug = BatchAugment(augment_config(p, masks.shape[-1]))
    g = torch.Generator().manual_seed(seed)
    covered, hidden, received, views = [], [], [], 0
    batch = min(p.batch_size, len(masks))
    for _ in range(batches):
        idx = torch.randperm(len(masks), generator=g)[:batch]
        view = aug.geometric(masks[idx].expand(-1, 3, -1, -1).contiguous(), g)[:, :1] > 0.5
        perm = torch.randperm(len(view), generator=g)
        (y1, y2, x1, x2), _ = cutmix_box(view.shape[2], view.shape[3], g)
        box = torch.zeros_like(view)
        box[:, :, y1:y2, x1:x2] = True
        area = view.flatten(1).sum(1).float()
        under = (view & box).flatten(1).sum(1).float()
        pasted = (view[perm] & box).flatten(1).sum(1).float()
        has = area > 0
        covered.append(under[has] / area[has])
        hidden.append(under[has] == area[has])
        received.append(pasted)
        views += len(view)
    covered_t, hidden_t, received_t = torch.cat(covered), torch.cat(hidden), torch.cat(received)
    return {
        "views": views,
        "views with a trigger (%)": 100 * len(covered_t) / views,
        "trigger area covered by the box (%)": 100 * float(covered_t.mean()) if len(covered_t) else float("nan"),
        "trigger hidden entirely (%)": 100 * float(hidden_t.float().mean()) if len(hidden_t) else float("nan"),
        "views given a trigger piece by the partner (%)": 100 * float((received_t > 0).float().mean()),
        "views given a quarter trigger or more (%)": 100 * float((received_t >= trigger_area / 4).float().mean()),
    }
