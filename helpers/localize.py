"""Trigger localization: where in an image does its cluster assignment come from?

Both defenses see the trained SSL backbone only through the k-means clustering of its features:
``ClusterClassifier`` turns the L2-normalised cluster centres into a cosine classifier (logit k =
cosine between the image's feature and centre k), so an image's "class" is its cluster.

- PatchSearch: Grad-CAM of that classifier with the image's own cluster as target (``grad_cam``),
  batched over images in one forward and one backward pass. ResNets use ``layer4``; ViTs the last
  block's ``norm1`` with the prefix (CLS) tokens dropped and the patch tokens laid out on their grid, and
  the target is the cluster for both families (the official ViT path targets the largest CLS-feature
  dimension instead, a defect not copied here). ``tests/test_localize.py`` checks the heatmaps against the
  ``pytorch-grad-cam`` library (``grad_cam_library``).
- PoisonCAM: cluster activation masking (``poisoncam_heatmaps``). The paper leaves these choices open;
  ours, each a parameter or stated here:
  * masks live on a coarse ``grid x grid`` of cells upsampled to the image (nearest for binary masks,
    bilinear for the 0-1 interval masks); a masked pixel is set to the dataset mean colour (0 after
    normalisation);
  * strategies: ``random`` (each cell kept with probability ``keep``), ``interval`` (each cell's value
    uniform in [0, 1], a soft mask) and ``full`` coverage (each cell masked in exactly
    ``round((1 - keep) * B)`` of the B masks, so every pixel is masked equally often);
  * the clustering outlier score of a masked image is how far its feature falls from its (unmasked)
    cluster's centre, as a z-score among that cluster's members: (d - mean_y) / std_y with d = 1 - cosine;
  * the heatmap of a pixel is the mean outlier score of the masks that hide it minus the mean of those
    that keep it (for soft masks, weighted by how much each mask hides / keeps it): regions whose removal
    throws the image out of its cluster light up, which is where a trigger that made the cluster is.
- Candidate trigger: the ``w x w`` window with the largest heatmap sum (``best_windows``, a batched box
  filter; ties go to the first window in row-major order), for both methods. ``w`` is chosen blind by the
  search (``helpers.search.choose_window``), the same way for both.
- PoisonCAM's poison score is its paper's (flip images whose assignment changes, in any direction;
  ``helpers.search.SCORE_RULES``); its flip-test set, iterative search and poison classifier are
  PatchSearch's, which the PoisonCAM paper describes in the same terms but without every detail: these are
  our choices, not the paper's.
- Trivial baselines (``localization_baselines``): a candidate window means something only where it hits
  triggers more often than a window of the same side at the image centre, or at a random place.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .compute import autocast, fp32_region


class ClusterClassifier(nn.Module):
    """Backbone + cosine classifier whose weights are the L2-normalised k-means centres.

    The backbone runs in ``precision`` (``fp32`` or ``bf16`` autocast, ``helpers.compute``); its features are
    cast to fp32 before they are normalised, and the cosines are computed in fp32."""

    def __init__(
        self,
        backbone: nn.Module,
        centroids: np.ndarray | torch.Tensor,
        cam_layer: str | None = None,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        c = torch.as_tensor(np.asarray(centroids), dtype=torch.float32)
        self.register_buffer("centroids", F.normalize(c, dim=1))
        self.cam_layer_name = cam_layer
        self.precision = precision

    @property
    def cam_layer(self) -> nn.Module:
        """The backbone's own CAM layer (ResNet ``layer4``, ViT last ``norm1``), or the ResNet stage named
        by ``cam_layer`` (e.g. ``layer3``: twice the resolution of ``layer4``)."""
        if self.cam_layer_name is None or not hasattr(self.backbone, "layer4"):
            return self.backbone.cam_layer
        if self.cam_layer_name not in ("layer1", "layer2", "layer3", "layer4"):
            raise ValueError(f"cam layer must be one of layer1..layer4, got {self.cam_layer_name!r}")
        return getattr(self.backbone, self.cam_layer_name)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.precision):
            feats = self.backbone(x)
        return F.normalize(feats.float(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        with fp32_region(x.device):
            return feats @ self.centroids.T


@torch.no_grad()
def assign(model: ClusterClassifier, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Cluster of each (normalised) image: argmax of the cosine logits."""
    out = [model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def vit_tokens_to_map(tokens: torch.Tensor, n_prefix: int = 1) -> torch.Tensor:
    """``B x (prefix + h*w) x D`` ViT tokens -> ``B x D x h x w``, prefix (CLS) tokens dropped."""
    patches = tokens[:, n_prefix:, :]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not form a square grid")
    return patches.reshape(len(tokens), side, side, -1).permute(0, 3, 1, 2)


def reshape_for(model: ClusterClassifier):
    """The activation reshape of the model's CAM layer: None for ResNets, the token grid for ViTs."""
    net = getattr(model.backbone, "net", None)
    if net is not None and hasattr(net, "blocks"):
        n_prefix = int(getattr(net, "num_prefix_tokens", 1))
        return lambda t: vit_tokens_to_map(t, n_prefix)
    return None


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    return (flat / (1e-7 + flat.max(dim=1, keepdim=True).values)).view_as(maps)


def grad_cam(model: ClusterClassifier, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM heatmaps ``N x H x W`` in [0, 1] of normalised images ``x`` for cluster ``targets``.

    One forward and one backward pass for the whole batch (the model is in eval mode, so every image's
    logits depend on that image alone). Channel weights are the spatial mean of the gradients of the
    target logit; the map is ReLU(sum of weighted activations), min-max scaled, upsampled bilinearly to the
    input size and min-max scaled again, the post-processing of ``pytorch-grad-cam``."""
    model.eval()
    reshape = reshape_for(model)
    store: dict[str, torch.Tensor] = {}
    handle = model.cam_layer.register_forward_hook(lambda m, i, o: store.__setitem__("act", o))
    try:
        with torch.enable_grad():
            logits = model(x)
            act = store["act"]
            score = logits.gather(1, targets.to(logits.device).view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, act)
    finally:
        handle.remove()
    act, grad = act.detach().float(), grad.float()
    if reshape is not None:
        act, grad = reshape(act), reshape(grad)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = _min_max(torch.relu((weights * act).sum(dim=1)))
    cam = F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return _min_max(torch.relu(cam))


def grad_cam_library(model: ClusterClassifier, x: torch.Tensor, targets) -> np.ndarray:
    """The same heatmaps with the ``pytorch-grad-cam`` library: the reference the tests compare against."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[model.cam_layer], reshape_transform=reshape_for(model)) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])


def grad_cam_batched(
    model: ClusterClassifier, x: torch.Tensor, targets: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """``grad_cam`` over a large set in chunks of ``batch_size`` images."""
    out = [grad_cam(model, x[i : i + batch_size], targets[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(out).cpu() if out else torch.zeros(0, *x.shape[-2:])


MASK_STRATEGIES = ("full", "random", "interval")


def make_masks(strategy: str, n_masks: int, size: int, grid: int, keep: float = 0.5, seed: int = 0) -> torch.Tensor:
    """``B x 1 x size x size`` masks: 1 keeps a pixel, 0 hides it (see the module text for the strategies)."""
    if strategy not in MASK_STRATEGIES:
        raise ValueError(f"mask strategy must be one of {', '.join(MASK_STRATEGIES)}, got {strategy!r}")
    if not 0 < keep < 1:
        raise ValueError(f"mask keep probability must be in (0, 1), got {keep}")
    g = torch.Generator().manual_seed(seed)
    if strategy == "interval":
        cells = torch.rand(n_masks, 1, grid, grid, generator=g)
        return F.interpolate(cells, size=(size, size), mode="bilinear", align_corners=False)
    if strategy == "random":
        cells = (torch.rand(n_masks, 1, grid, grid, generator=g) < keep).float()
    else:  # full coverage: every cell hidden in exactly n_hidden of the masks
        n_hidden = max(1, round((1 - keep) * n_masks))
        ranks = torch.rand(grid * grid, n_masks, generator=g).argsort(dim=1).argsort(dim=1)
        cells = (ranks >= n_hidden).float().T.reshape(n_masks, 1, grid, grid)
    return F.interpolate(cells, size=(size, size), mode="nearest")


@torch.no_grad()
def poisoncam_heatmaps(
    model: ClusterClassifier,
    x: torch.Tensor,
    clusters: torch.Tensor,
    masks: torch.Tensor,
    stats: np.ndarray,
    batch_size: int = 1024,
    progress: bool = False,
) -> torch.Tensor:
    """PoisonCAM heatmaps ``N x H x W`` in [0, 1] of normalised images ``x`` in ``clusters``.

    Every image is forwarded under every mask (``len(masks)`` forwards per image, batched over images and
    masks); the outlier score of each masked copy is contrasted between the masks that hide a pixel and
    those that keep it."""
    model.eval()
    device = x.device
    masks = masks.to(device)
    n_masks = len(masks)
    hidden, kept = (1 - masks)[:, 0], masks[:, 0]  # B x H x W
    hidden_w = hidden / hidden.sum(0).clamp_min(1e-6)
    kept_w = kept / kept.sum(0).clamp_min(1e-6)
    mean_std = torch.as_tensor(stats, device=device)
    per_batch = max(1, batch_size // n_masks)
    out = []
    for start in tqdm(range(0, len(x), per_batch), desc="PoisonCAM", disable=not progress, leave=False):
        xb, cb = x[start : start + per_batch], clusters[start : start + per_batch].to(device)
        masked = (xb[:, None] * masks[None]).flatten(0, 1).contiguous(memory_format=torch.channels_last)
        feats = model.features(masked).view(len(xb), n_masks, -1)  # fp32, whatever the backbone's precision
        with fp32_region(device):
            d = 1 - (feats * model.centroids[cb][:, None, :]).sum(-1)  # n x B
            z = (d - mean_std[cb, :1]) / mean_std[cb, 1:]
            heat = torch.einsum("nb,bhw->nhw", z, hidden_w) - torch.einsum("nb,bhw->nhw", z, kept_w)
        out.append(_min_max(heat).cpu())
    return torch.cat(out) if out else torch.zeros(0, *x.shape[-2:])


def best_windows(heatmaps: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left ``(xs, ys)`` of the ``w x w`` window with the largest heatmap sum, for each ``N x H x W`` map."""
    n, height, width = heatmaps.shape
    if not 1 <= w <= min(height, width):
        raise ValueError(f"window side {w} does not fit heatmaps of {height}x{width}")
    sums = F.avg_pool2d(heatmaps[:, None].double(), w, stride=1)[:, 0] * (w * w)
    idx = sums.flatten(1).argmax(1)
    cols = width - w + 1
    return idx % cols, idx // cols


def cut_patches(pixels: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, w: int) -> torch.Tensor:
    """The ``w x w`` crops at ``(xs, ys)`` of ``N x C x H x W`` images, as ``N x C x w x w``."""
    d = torch.arange(w)
    rows = (ys.long()[:, None] + d)[:, :, None]
    cols = (xs.long()[:, None] + d)[:, None, :]
    b = torch.arange(len(pixels))[:, None, None]
    return pixels[b, :, rows, cols].permute(0, 3, 1, 2).contiguous()


def window_hits(xs, ys, w: int, boxes: np.ndarray, min_cover: float = 0.5) -> np.ndarray:
    """Does each candidate window hit its true trigger box ``(x, y, side)``: does their overlap cover at
    least ``min_cover`` of the smaller of the two (a window smaller than the trigger can still hit it)?"""
    xs, ys = np.asarray(xs), np.asarray(ys)
    bx, by, bs = boxes[:, 0], boxes[:, 1], boxes[:, 2]
    ix = np.clip(np.minimum(xs + w, bx + bs) - np.maximum(xs, bx), 0, None)
    iy = np.clip(np.minimum(ys + w, by + bs) - np.maximum(ys, by), 0, None)
    return ix * iy >= min_cover * np.minimum(bs * bs, w * w)


def window_hits_any(xs, ys, w: int, boxes: np.ndarray, min_cover: float = 0.5) -> np.ndarray:
    """``window_hits`` where each image may carry several triggers (``boxes`` ``N x copies x >=3``, or
    ``N x >=3`` for one each): a window hits when it hits any of its image's triggers."""
    boxes = np.asarray(boxes)
    if boxes.ndim == 2:
        return window_hits(xs, ys, w, boxes[:, :3], min_cover)
    return np.any([window_hits(xs, ys, w, boxes[:, c, :3], min_cover) for c in range(boxes.shape[1])], axis=0)


def centre_window(size: int, w: int) -> tuple[int, int]:
    """Top-left corner of the ``w x w`` window at the centre of a ``size x size`` image."""
    return (size - w) // 2, (size - w) // 2


def random_window_hit_rate(boxes: np.ndarray, w: int, size: int, min_cover: float = 0.5) -> np.ndarray:
    """Per image, the chance that a ``w x w`` window at a uniformly random place of a ``size x size`` image
    hits its trigger(s) (``window_hits_any``): the exact mean over every window position, not a sample."""
    positions = np.arange(size - w + 1)
    xs, ys = (grid.ravel() for grid in np.meshgrid(positions, positions))
    boxes = np.asarray(boxes)
    return np.array([window_hits_any(xs, ys, w, np.repeat(b[None], len(xs), 0), min_cover).mean() for b in boxes])


def localization_baselines(boxes: np.ndarray, w: int, size: int, min_cover: float = 0.5) -> dict[str, float]:
    """The trivial guesses a localization must beat, by the same hit rule: the share of images whose
    trigger a fixed window at the image centre hits, and the expected share a window at a random place
    hits. ``boxes``: ``N x >=3`` or ``N x copies x >=3`` true ``(x, y, side)`` boxes."""
    boxes = np.asarray(boxes)
    if not len(boxes):
        return {"centre": float("nan"), "random": float("nan")}
    cx, cy = centre_window(size, w)
    centre = window_hits_any(np.full(len(boxes), cx), np.full(len(boxes), cy), w, boxes, min_cover)
    return {"centre": float(centre.mean()), "random": float(random_window_hit_rate(boxes, w, size, min_cover).mean())}
