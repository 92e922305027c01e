"""MoCo-v2 augmentations, per sample but vectorised over the batch on the training device.

torchvision applies its transforms one PIL image at a time (in DataLoader workers); on a 2-core CPU that
per-image work costs as much as the network. Here every sample draws its own parameters, exactly as the
per-image pipeline would, and the whole batch is transformed with a handful of tensor operations:

- random resized crop (torchvision's sampling: 10 tries, then the centre fallback) and horizontal flip as
  one affine grid per sample, resampled bilinearly (``grid_sample``). Unlike torchvision's resize this
  does not antialias when a crop is shrunk; at 32 px crops are almost always enlarged.
- colour jitter (brightness, contrast, saturation, hue; torchvision's formulas) with probability p, the
  four in a random order per sample; random grayscale; Gaussian blur with a per-sample sigma.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentConfig:
    size: int  # output side
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0  # MoCo-v2 uses 0.5 at 224 px; CIFAR recipes leave blur out
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = CIFAR_MEAN
    std: tuple[float, float, float] = CIFAR_STD


def _uniform(shape, low, high, generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator) * (high - low) + low


def sample_crops(batch: int, height: int, width: int, scale, ratio, generator) -> torch.Tensor:
    """Per-sample ``(top, left, h, w)`` as torchvision's ``RandomResizedCrop.get_params`` draws them."""
    area = height * width
    tries = 10
    target_area = area * _uniform((batch, tries), scale[0], scale[1], generator)
    log_ratio = _uniform((batch, tries), math.log(ratio[0]), math.log(ratio[1]), generator)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = ok.float().argmax(dim=1)  # the first try that fits
    w, h = w.gather(1, first[:, None])[:, 0], h.gather(1, first[:, None])[:, 0]
    found = ok.any(dim=1)
    # torchvision's fallback: the whole image, cropped to the nearest allowed aspect ratio, centred
    in_ratio = width / height
    fw, fh = float(width), float(height)
    if in_ratio < min(ratio):
        fh = float(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw = float(round(height * max(ratio)))
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    top = torch.floor(torch.rand(batch, generator=generator) * (height - h + 1))
    left = torch.floor(torch.rand(batch, generator=generator) * (width - w + 1))
    top = torch.where(found, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(found, left, torch.full_like(left, (width - fw) // 2))
    return torch.stack([top, left, h, w], dim=1)


def crop_flip_grid(crops: torch.Tensor, flips: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """Sampling grid that maps each ``size x size`` output onto its crop (align_corners=False)."""
    top, left, h, w = crops.unbind(1)
    theta = torch.zeros(len(crops), 2, 3)
    theta[:, 0, 0] = torch.where(flips, -w / width, w / width)
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [len(crops), 3, size, size], align_corners=False)
    # Clamp the source coordinates to the crop, as resizing the cropped image would: the edge pixels of a
    # crop must not blend in their neighbours outside it.
    px = ((grid[..., 0] + 1) * width - 1) / 2
    py = ((grid[..., 1] + 1) * height - 1) / 2
    px = torch.minimum(torch.maximum(px, left[:, None, None]), (left + w - 1)[:, None, None])
    py = torch.minimum(torch.maximum(py, top[:, None, None]), (top + h - 1)[:, None, None])
    return torch.stack([(2 * px + 1) / width - 1, (2 * py + 1) / height - 1], dim=-1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype)
    return (x * weights[:, None, None]).sum(dim=1, keepdim=True)


def adjust_brightness(x, factor):
    return (x * factor[:, None, None, None]).clamp(0, 1)


def adjust_contrast(x, factor):
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = factor[:, None, None, None]
    return (f * x + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(x, factor):
    f = factor[:, None, None, None]
    return (f * x + (1 - f) * grayscale(x)).clamp(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = torch.stack(
        [torch.stack(c, dim=1) for c in [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]]
    )  # 6 x B x 3 x H x W
    return choices.gather(0, i[None, :, None].expand(1, -1, 3, -1, -1))[0]


def adjust_hue(x, factor):
    hsv = rgb_to_hsv(x)
    hsv[:, 0] = (hsv[:, 0] + factor[:, None, None]) % 1.0
    return hsv_to_rgb(hsv)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable blur, one sigma per sample (depthwise grouped convolution over the batch)."""
    batch, channels, height, width = x.shape
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # (B*C) x k
    flat = F.pad(x.reshape(1, batch * channels, height, width), (half, half, half, half), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=batch * channels)
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


SELECT: bool | None = None  # BatchAugment's select where it is given none (None: by device); make bench sets it


def _apply_rows(x: torch.Tensor, drawn: torch.Tensor, op) -> torch.Tensor:
    """``op(x[rows], rows)`` written into the rows where ``drawn`` (in place)."""
    rows = torch.nonzero(drawn)[:, 0]
    if len(rows):
        x[rows] = op(x[rows], rows)
    return x


def _apply_where(x: torch.Tensor, drawn: torch.Tensor, op) -> torch.Tensor:
    """``op`` of the whole batch, kept in the rows where ``drawn``: no host synchronisation."""
    rows = torch.arange(len(x), device=x.device)
    return torch.where(drawn[:, None, None, None], op(x, rows), x)


class BatchAugment:
    """``augment(uint8 images, generator) -> normalised float views``; every sample draws its own parameters.

    ``select``: apply each colour operation to the whole batch and keep it where drawn (``torch.where``), with
    no host synchronisation, instead of to the drawn rows alone (``torch.nonzero``, which waits for the device
    18 times a view). ``None``: where the images are on a GPU, whose idle waits cost more than the extra
    arithmetic; on a CPU the rows alone cost less. Both give the same views from the same draws
    (``tests/test_augment.py``)."""

    def __init__(self, config: AugmentConfig, select: bool | None = None) -> None:
        self.config = config
        self.select = select

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.photometric(self.geometric(images, generator), generator)

    def geometric(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random resized crop and flip of uint8 images: float images in [0, 1] of the output size."""
        c = self.config
        batch, _, height, width = images.shape
        x = images.float().div_(255)
        crops = sample_crops(batch, height, width, c.crop_scale, c.crop_ratio, generator)
        flips = torch.rand(batch, generator=generator) < c.flip_p
        grid = crop_flip_grid(crops, flips, height, width, c.size).to(images.device)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def photometric(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Colour jitter, grayscale and blur of float images in [0, 1], then normalisation."""
        c = self.config
        batch, device = len(x), x.device

        jitter = torch.rand(batch, generator=generator) < c.jitter_p
        factors = torch.stack(
            [
                _uniform(batch, max(0.0, 1 - c.brightness), 1 + c.brightness, generator),
                _uniform(batch, max(0.0, 1 - c.contrast), 1 + c.contrast, generator),
                _uniform(batch, max(0.0, 1 - c.saturation), 1 + c.saturation, generator),
                _uniform(batch, -c.hue, c.hue, generator),
            ],
            dim=1,
        ).to(device)
        order = torch.rand(batch, 4, generator=generator).argsort(dim=1).to(device)
        ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        jitter = jitter.to(device)
        select = next(v for v in (self.select, SELECT, x.device.type == "cuda") if v is not None)
        apply = _apply_where if select else _apply_rows
        for step in range(4):
            for k, op in enumerate(ops):
                x = apply(x, jitter & (order[:, step] == k), lambda v, rows, op=op, k=k: op(v, factors[rows, k]))

        gray = (torch.rand(batch, generator=generator) < c.gray_p).to(device)
        x = apply(x, gray, lambda v, rows: grayscale(v).expand(-1, 3, -1, -1))
        blur_draw = torch.rand(batch, generator=generator) < c.blur_p
        sigma = _uniform(batch, c.blur_sigma[0], c.blur_sigma[1], generator).to(device)
        if c.blur_p > 0:
            kernel_size = 2 * max(1, round(0.05 * c.size)) + 1  # ~10% of the side, odd (23 at 224)
            x = apply(x, blur_draw.to(device), lambda v, rows: gaussian_blur(v, sigma[rows], kernel_size))
        mean = torch.tensor(c.mean, device=device)[:, None, None]
        std = torch.tensor(c.std, device=device)[:, None, None]
        return (x - mean) / std
