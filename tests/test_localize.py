"""Trigger localization: Grad-CAM against pytorch-grad-cam, PoisonCAM masks and heatmaps, the box filter."""

import numpy as np
import pytest
import torch

from helpers.cluster import cluster_outlier_stats
from helpers.localize import (
    ClusterClassifier,
    best_windows,
    cut_patches,
    grad_cam,
    grad_cam_library,
    localization_baselines,
    make_masks,
    poisoncam_heatmaps,
    random_window_hit_rate,
    window_hits,
    window_hits_any,
)
from helpers.models import ResNet, ViT


def _classifier(backbone, images, k=5):
    with torch.no_grad():
        feats = backbone.eval()(images)
    return ClusterClassifier(backbone, feats[:k] + 0.1 * torch.randn(k, feats.shape[1])).eval()


@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_grad_cam_equals_the_library(family):
    torch.manual_seed(0)
    if family == "resnet":
        backbone = ResNet((1, 1, 1, 1), width=8, stem="cifar", stem_stride=1)
    else:
        backbone = ViT(32, 4, embed_dim=32, depth=2, num_heads=2)
    x = torch.randn(6, 3, 32, 32)
    model = _classifier(backbone, x)
    targets = model(x).argmax(1)  # each image's own cluster
    ours = grad_cam(model, x, targets).numpy()
    reference = grad_cam_library(model, x, targets.tolist())
    assert ours.shape == reference.shape == (6, 32, 32)
    assert np.abs(ours - reference).max() <= 1e-4
    assert ours.max() > 0.99 and ours.min() == 0  # min-max scaled maps, not all zero


def test_grad_cam_targets_matter():
    torch.manual_seed(1)
    backbone = ResNet((1, 1, 1, 1), width=8)
    x = torch.randn(6, 3, 32, 32)
    model = _classifier(backbone, x)
    a = grad_cam(model, x, torch.zeros(6, dtype=torch.long))
    b = grad_cam(model, x, torch.full((6,), 3))
    assert (a - b).abs().max() > 0.05


def test_box_filter_finds_the_hot_window():
    heat = torch.zeros(2, 16, 16)
    heat[0, 3:7, 5:9] = 1.0  # a 4x4 hot block at x=5, y=3
    heat[1, 10:13, 0:3] = 1.0  # a 3x3 block at x=0, y=10
    heat[1, 0, 15] = 2.5  # one hot pixel: the 3x3 block still wins a 3x3 window (9 > 2.5)
    xs, ys = best_windows(heat, 4)
    assert (int(xs[0]), int(ys[0])) == (5, 3)
    xs, ys = best_windows(heat, 3)
    assert (int(xs[1]), int(ys[1])) == (0, 10)
    xs, ys = best_windows(heat, 1)
    assert (int(xs[1]), int(ys[1])) == (15, 0)
    with pytest.raises(ValueError, match="does not fit"):
        best_windows(heat, 17)


def test_cut_patches_and_hits():
    pixels = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).view(2, 3, 8, 8)
    patches = cut_patches(pixels, torch.tensor([1, 4]), torch.tensor([2, 0]), 3)
    assert torch.equal(patches[0], pixels[0, :, 2:5, 1:4]) and torch.equal(patches[1], pixels[1, :, 0:3, 4:7])
    boxes = np.array([[1, 2, 3], [0, 0, 4]])
    hits = window_hits([1, 6], [2, 6], 3, boxes)
    assert hits.tolist() == [True, False]
    # a 2x2 window inside a 6x6 trigger hits it; half off its corner (1 of 4 pixels) does not
    assert window_hits([3, 5], [3, 5], 2, np.array([[2, 2, 6], [0, 0, 6]])).tolist() == [True, False]


def test_full_coverage_masks_hide_every_pixel_equally():
    masks = make_masks("full", 64, 32, 8, keep=0.5, seed=0)
    hidden = (1 - masks)[:, 0].sum(0)
    assert masks.shape == (64, 1, 32, 32)
    assert torch.all(hidden == 32)  # every pixel hidden by exactly half of the masks
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    rand = (1 - make_masks("random", 64, 32, 8, keep=0.5, seed=0))[:, 0].sum(0)
    assert rand.min() < rand.max()  # random masks do not cover evenly
    soft = make_masks("interval", 8, 32, 4, seed=0)
    assert 0 <= soft.min() and soft.max() <= 1 and len(soft.unique()) > 2
    with pytest.raises(ValueError, match="mask strategy"):
        make_masks("checker", 4, 32, 4)


class GreenPatchNet(torch.nn.Module):
    """Toy backbone: feature = (1 + max blue, 40 x share of pure green pixels). Cluster 1 = 'has the patch'."""

    def forward(self, x):
        green = ((x[:, 1] > 0.9) & (x[:, 0] < 0.1) & (x[:, 2] < 0.1)).float().mean((1, 2))
        return torch.stack([1 + x[:, 2].amax((1, 2)), 40 * green], 1)


def test_poisoncam_locates_a_planted_patch():
    torch.manual_seed(0)
    images = torch.rand(5, 3, 32, 32) * 0.5
    corners = [(4, 6), (20, 18), (12, 2), (18, 8), (2, 20)]
    for img, (x, y) in zip(images, corners, strict=True):
        img[:, y : y + 8, x : x + 8] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    model = ClusterClassifier(GreenPatchNet(), centroids)
    clusters = model(images).argmax(1)
    assert torch.all(clusters == 1)
    feats = torch.cat([GreenPatchNet()(images), torch.tensor([[1.2, 0.0]] * 5)]).numpy()
    stats = cluster_outlier_stats(feats, np.r_[[1] * 5, [0] * 5], centroids.numpy())
    masks = make_masks("full", 64, 32, 8, keep=0.5, seed=1)
    heat = poisoncam_heatmaps(model, images, clusters, masks, stats, batch_size=128)
    xs, ys = best_windows(heat, 8)
    boxes = np.array([[x, y, 8] for x, y in corners])
    assert window_hits(xs.numpy(), ys.numpy(), 8, boxes).all()


def test_localization_baselines_on_hand_made_boxes():
    # 8x8 images, 4 px windows; the centre window sits at (2, 2)
    boxes = np.array([[2, 2, 4], [0, 0, 4], [4, 4, 4], [3, 2, 4]])
    out = localization_baselines(boxes, 4, 8)
    # centre window: hits the centred box and the one shifted by a pixel (3 x 4 = 12 >= 8), misses corners
    assert out["centre"] == 0.5
    # random window on the corner box (0, 0): overlap (4 - x)(4 - y) >= 8 at 6 of the 25 places, by hand:
    # x = 0: y <= 2 (3); x = 1: y <= 1 (2); x = 2: y = 0 (1)
    assert np.isclose(random_window_hit_rate(boxes[1:2], 4, 8)[0], 6 / 25)
    assert np.isclose(random_window_hit_rate(boxes[2:3], 4, 8)[0], 6 / 25)  # the opposite corner, mirrored
    assert np.isclose(out["random"], random_window_hit_rate(boxes, 4, 8).mean())
    # several triggers per image: a window hits when it hits any of them
    two = np.array([[[0, 0, 4], [2, 2, 4]], [[0, 0, 4], [4, 4, 4]]])
    assert localization_baselines(two, 4, 8)["centre"] == 0.5
    assert window_hits_any(np.array([4, 4]), np.array([4, 4]), 4, two).tolist() == [False, True]
