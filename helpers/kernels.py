"""Batched image kernels that run on whatever device their tensors are on (CPU or GPU).

``paste_patches`` pastes one patch per image at a per-image location in a single indexed write: the
attack uses it to plant triggers, the flip test to paste candidate triggers on many images at once, and
the poison classifier to paste top-k patches on training batches.
"""

from __future__ import annotations

import torch


def paste_patches(
    images: torch.Tensor,
    patches: torch.Tensor,
    xs: torch.Tensor,
    ys: torch.Tensor,
    sizes: torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Paste ``patches`` fully opaque onto ``images`` with top-left corners ``(xs, ys)``.

    Args:
        images: ``B x C x H x W``, any dtype.
        patches: ``B x C x h x w`` (one per image) or ``C x h x w`` (the same for all), images' dtype.
        xs, ys: ``B`` integer top-left columns and rows; a patch reaching past an edge (even a
            negative corner) is clipped to the image.
        sizes: optional ``B`` or ``B x 2`` (height, width) per image: only the top-left ``sizes[b]``
            part of patch ``b`` is pasted, so patches of several sizes can travel in one padded batch.
        inplace: write into ``images`` instead of a copy.

    Returns the pasted images.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be B x C x H x W, got shape {tuple(images.shape)}")
    batch, channels, height, width = images.shape
    if patches.dim() == 3:
        patches = patches.unsqueeze(0).expand(batch, -1, -1, -1)
    if patches.shape[:2] != (batch, channels):
        raise ValueError(f"patches of shape {tuple(patches.shape)} do not fit images of shape {tuple(images.shape)}")
    device = images.device
    xs, ys = xs.to(device=device, dtype=torch.long), ys.to(device=device, dtype=torch.long)
    if xs.shape != (batch,) or ys.shape != (batch,):
        raise ValueError(f"xs and ys must have shape ({batch},), got {tuple(xs.shape)} and {tuple(ys.shape)}")
    out = images if inplace else images.clone()
    patch_h, patch_w = patches.shape[-2:]
    dy = torch.arange(patch_h, device=device)
    dx = torch.arange(patch_w, device=device)
    rows = ys[:, None] + dy  # B x h
    cols = xs[:, None] + dx  # B x w
    keep = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    if sizes is not None:
        sizes = sizes.to(device=device, dtype=torch.long)
        size_h, size_w = (sizes, sizes) if sizes.dim() == 1 else (sizes[:, 0], sizes[:, 1])
        keep &= (dy[None, :, None] < size_h[:, None, None]) & (dx[None, None, :] < size_w[:, None, None])
    b, i, j = keep.nonzero(as_tuple=True)
    # Advanced indices around a slice: both sides are K x C (K pasted pixels), one indexed write.
    out[b, :, rows[b, i], cols[b, j]] = patches.to(device)[b, :, i, j]
    return out
