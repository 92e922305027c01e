"""Backbones: ResNet-18 (CIFAR or ImageNet stem, width multiplier) and ViT (timm) for SSL.

Every backbone maps ``B x 3 x H x W`` normalised images to ``B x feature_dim`` features and names its last
convolutional stage / last block so Grad-CAM can hook it later (``cam_layer``). ``backbone_for`` builds the
one an SSL profile trains; ``Normaliser`` and ``extract_features`` feed it uint8 images (every later stage
reads a backbone through them: clustering, the probe).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .compute import autocast

if TYPE_CHECKING:
    from .params import SSLParams


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with BasicBlocks. ``blocks=(2, 2, 2, 2)`` is ResNet-18, ``(1, 1, 1, 1)`` the ResNet-10 of the
    poison classifier. ``stem='cifar'``: one 3x3 conv (stride ``stem_stride``), no max-pool, for 32 px;
    ``stem='imagenet'``: 7x7 stride-2 conv and max-pool, for 224 px. ``width`` is the first stage's
    channels (64 in the standard network)."""

    def __init__(self, blocks=(2, 2, 2, 2), width: int = 64, stem: str = "cifar", stem_stride: int = 1) -> None:
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
            )
        elif stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, 7, 2, 3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            raise ValueError(f"ssl.stem must be 'cifar' or 'imagenet', got {stem!r}")
        layers, c_in = [], width
        for stage, n_blocks in enumerate(blocks):
            c_out = width * 2**stage
            stage_blocks = [
                BasicBlock(c_in if b == 0 else c_out, c_out, (1 if stage == 0 else 2) if b == 0 else 1)
                for b in range(n_blocks)
            ]
            layers.append(nn.Sequential(*stage_blocks))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.feature_dim = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def cam_layer(self) -> nn.Module:
        return self.layer4

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean(dim=(2, 3))


class ViT(nn.Module):
    """A timm VisionTransformer without head (never ``pretrained``: nothing downloads). Features are the
    CLS token after the final norm."""

    def __init__(
        self, image_size: int, patch_size: int, embed_dim: int = 192, depth: int = 12, num_heads: int = 3
    ) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.net = VisionTransformer(
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            num_classes=0,
            global_pool="token",
        )
        self.feature_dim = embed_dim

    @property
    def cam_layer(self) -> nn.Module:
        return self.net.blocks[-1].norm1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_backbone(
    arch: str,
    image_size: int,
    width: int = 64,
    stem: str = "cifar",
    stem_stride: int = 1,
    vit_patch: int = 4,
    vit_dim: int = 192,
    vit_depth: int = 12,
    vit_heads: int = 3,
) -> nn.Module:
    if arch == "resnet18":
        return ResNet((2, 2, 2, 2), width, stem, stem_stride)
    if arch == "resnet10":
        return ResNet((1, 1, 1, 1), width, stem, stem_stride)
    if arch == "vit":
        return ViT(image_size, vit_patch, vit_dim, vit_depth, vit_heads)
    raise ValueError(f"ssl.arch must be resnet18, resnet10 or vit, got {arch!r}")


def backbone_for(p: SSLParams, image_size: int) -> nn.Module:
    """The backbone that the SSL params ``p`` train, for images of side ``image_size``."""
    return build_backbone(
        p.arch, image_size, p.width, p.stem, p.stem_stride, p.vit_patch, p.vit_dim, p.vit_depth, p.vit_heads
    )


class Normaliser:
    """uint8 ``N x 3 x H x W`` pixels -> the normalised float input of the backbone, on ``device``."""

    def __init__(self, mean, std, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=self.device)[:, None, None]
        self.std = torch.tensor(std, device=self.device)[:, None, None]

    def __call__(self, pixels) -> torch.Tensor:
        x = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.asarray(pixels))
        x = x.to(self.device).float().div_(255)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def extract_features(
    backbone: torch.nn.Module,
    pixels,
    mean,
    std,
    batch_size: int = 512,
    progress: bool = False,
    desc: str = "features",
    precision: str = "fp32",
) -> np.ndarray:
    """Backbone features of uint8 ``N x 3 x H x W`` images (eval mode, no augmentation), computed in
    ``precision`` (``helpers.compute``) and returned as fp32."""
    device = next(backbone.parameters()).device
    normalise = Normaliser(mean, std, device)
    backbone.eval()
    out = []
    for start in tqdm(range(0, len(pixels), batch_size), desc=desc, disable=not progress, leave=False):
        with autocast(device, precision):
            feats = backbone(normalise(pixels[start : start + batch_size]))
        out.append(feats.float().cpu())
    return torch.cat(out).numpy()
