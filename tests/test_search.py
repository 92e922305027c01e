"""Flip test, iterative search and its pruning arithmetic, on cases whose answers are known by construction."""

import numpy as np
import torch

from helpers.cam import ClusterClassifier, Normaliser
from helpers.models import ResNet
from helpers.search import (
    flip_set,
    flip_test,
    flip_test_loop,
    iterative_search,
    paste_locations,
    prune_count,
    relative_std,
    top_k_accuracy,
)


class GreenPatchNet(torch.nn.Module):
    """feature = (1 + max blue, 10 x share of pure green pixels): a green w x w patch on a 16 x 16 image
    moves it to cluster 1 exactly when 10 w^2 / 256 > 1 + its blue level."""

    def forward(self, x):
        green = ((x[:, 1] > 0.9) & (x[:, 0] < 0.1) & (x[:, 2] < 0.1)).float().mean((1, 2))
        return torch.stack([1 + x[:, 2].amax((1, 2)), 10 * green], 1)


def _toy():
    blue = torch.tensor([0.1, 0.2, 0.3, 0.5, 0.7, 0.9])  # a 6 px patch (10 * 36 / 256 = 1.41) flips the first 3
    flips = torch.zeros(6, 3, 16, 16, dtype=torch.uint8)
    flips[:, 2] = (blue * 255).round().to(torch.uint8)[:, None, None]
    model = ClusterClassifier(GreenPatchNet(), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    return model, Normaliser((0, 0, 0), (1, 1, 1)), flips


def test_poison_score_counts_the_known_flips():
    model, norm, flips = _toy()
    before = model(norm(flips)).argmax(1)
    assert torch.all(before == 0)
    green = torch.zeros(3, 3, 6, 6, dtype=torch.uint8)
    green[:, 1] = 255
    green[2] = 0  # a black patch flips nothing
    clusters = torch.tensor([1, 0, 1])
    loc = paste_locations([0, 1, 2], 6, 16, 16, 6, seed=0)
    scores = flip_test(model, norm, flips, before, green, clusters, loc, batch_size=5)
    # green patch, its image in cluster 1: 3 flips into 1; in cluster 0: 3 of 6 leave it; black: nothing
    assert scores.tolist() == [3, -3, 0]
    assert flip_test_loop(model, norm, flips, before, green, clusters, loc).tolist() == [3, -3, 0]


def test_batched_flip_test_equals_the_loop_on_a_network():
    torch.manual_seed(0)
    backbone = ResNet((1, 1, 1, 1), width=8, stem_stride=2).eval()
    pixels = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    norm = Normaliser((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    with torch.no_grad():
        feats = backbone(norm(pixels))
    model = ClusterClassifier(backbone, feats[:4]).eval()
    flips = pixels[:12]
    before = model(norm(flips)).argmax(1)
    patches = pixels[20:30, :, 4:14, 4:14]
    clusters = torch.arange(10) % 4
    loc = paste_locations(np.arange(20, 30), len(flips), 32, 32, 10, seed=3)
    batched = flip_test(model, norm, flips, before, patches, clusters, loc, batch_size=37)
    assert batched.tolist() == flip_test_loop(model, norm, flips, before, patches, clusters, loc).tolist()
    assert np.abs(batched).sum() > 0  # the case is not trivially all zero


def test_paste_locations_depend_on_the_image_not_the_batch():
    a = paste_locations([5, 9], 4, 32, 32, 8, seed=1)
    b = paste_locations([9], 4, 32, 32, 8, seed=1)
    assert torch.equal(a[1], b[0])
    assert a.min() >= 0 and a.max() <= 24


def test_flip_set_takes_the_member_nearest_each_centre():
    feats = np.array([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8], [0.1, 1]], dtype=np.float32)
    assignment = np.array([0, 0, 1, 1, 1])
    centroids = np.array([[1, 0], [0, 1]], dtype=np.float32)
    assert flip_set(feats, assignment, centroids).tolist() == [0, 2]


def test_pruning_arithmetic():
    assert [prune_count(n, 0.25) for n in (100, 75, 8, 3, 1)] == [25, 19, 2, 1, 1]
    alive, n = [], 100
    while n:
        alive.append(n)
        n -= prune_count(n, 0.25)
    assert alive == [100, 75, 56, 42, 31, 23, 17, 12, 9, 6, 4, 3, 2, 1]


def test_iterative_search_prunes_the_least_poisonous_clusters():
    assignment = np.repeat(np.arange(8), 100)  # 8 clusters of 100; cluster c's images score c
    calls = []

    def score(idx):
        calls.append(np.unique(assignment[idx]).tolist())
        return assignment[idx].astype(float)

    result = iterative_search(assignment, score, samples_per_cluster=2, prune_fraction=0.25, seed=0)
    assert [r["clusters"] for r in result.rounds] == [8, 6, 4, 3, 2, 1]
    assert calls == [list(range(8)), list(range(2, 8)), list(range(4, 8)), [5, 6, 7], [6, 7], [7]]
    assert result.scored.sum() == 2 * (8 + 6 + 4 + 3 + 2 + 1)
    assert np.all(assignment[result.ranking()[:12]] == 7)  # cluster 7 was scored in every round: 12 images
    assert np.all(result.scores[~result.scored] == 0)


def test_exhausted_clusters_drop_out():
    assignment = np.array([0] * 2 + [1] * 10 + [2] * 10)
    result = iterative_search(assignment, lambda idx: np.array([9.0, 5.0, 1.0])[assignment[idx]], 2, 0.25)
    # round 0: cluster 2 pruned (lowest), cluster 0 has no unscored image left; round 1: cluster 1 alone
    assert [r["clusters"] for r in result.rounds] == [3, 1]
    assert result.scored.sum() == 8 and result.scored[:2].all()


def test_rsd_and_top_k():
    assert np.isclose(relative_std(np.array([1.0, 3.0])), 0.5)
    assert np.isnan(relative_std(np.array([0.0, 0.0])))
    mask = np.array([True, False, True, True])
    assert top_k_accuracy(np.array([0, 2, 1, 3]), mask, k=2) == 1.0
    assert top_k_accuracy(np.array([1, 0, 2, 3]), mask, k=2) == 0.5
