import numpy as np
import pytest

from helpers import cluster, evaluate


def test_fp_and_asr_on_a_hand_made_case():
    # target 2; 4 non-target images, 2 of them predicted as the target
    labels = np.array([0, 1, 2, 2, 1, 0])
    preds = np.array([2, 1, 2, 0, 2, 0])
    m = evaluate.attack_metrics(preds, labels, target=2)
    assert m["fp"] == 2 and m["asr"] == pytest.approx(2 / 4) and m["acc"] == pytest.approx(3 / 6)
    # a target image predicted as something else is an error, not a false positive
    assert evaluate.attack_metrics(np.array([0, 0]), np.array([2, 2]), target=2) == {"acc": 0.0, "fp": 0, "asr": 0}


def test_confusion_matrix_counts():
    cm = evaluate.confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_label_subsets_are_balanced_seeded_and_at_least_one():
    labels = np.repeat(np.arange(4), [100, 50, 10, 3])
    subset = evaluate.label_subset(labels, 0.1, seed=0)
    assert np.bincount(labels[subset]).tolist() == [10, 5, 1, 1]
    assert np.array_equal(subset, evaluate.label_subset(labels, 0.1, seed=0))
    assert not np.array_equal(subset, evaluate.label_subset(labels, 0.1, seed=1))


def separable(n=200, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    centres = np.eye(3, 16) * 5
    return centres[labels] + rng.normal(size=(n, 16)), labels


def test_knn_and_linear_probe_on_separable_features():
    x, y = separable()
    xt, yt = separable(seed=1)
    assert (evaluate.knn_predict(x, y, xt, 3, k=5) == yt).mean() > 0.97
    probe = evaluate.LinearProbe(3, epochs=100).fit(x, y)
    assert (probe.predict(xt) == yt).mean() > 0.97


def test_a_diverging_probe_or_a_nan_backbone_is_refused_with_its_cause():
    from helpers.compute import TrainingDiverged

    x, y = separable()
    with pytest.raises(TrainingDiverged, match=r"linear probe seed 0: the loss is nan.*eval\.probe_lr = inf"):
        evaluate.LinearProbe(3, epochs=5, lr=float("inf")).fit(x, y)
    x[3, 2] = np.nan
    with pytest.raises(TrainingDiverged, match="frozen features are not finite"):
        evaluate.LinearProbe(3, epochs=5).fit(x, y)


def test_a_diverging_finetune_names_its_keys():
    import torch

    from helpers.augment import AugmentConfig, BatchAugment
    from helpers.compute import TrainingDiverged
    from helpers.finetune import finetune
    from helpers.models import ResNet
    from helpers.params import FinetuneParams

    backbone = ResNet((1, 1, 1, 1), width=4)
    pixels = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    labels = np.arange(16) % 2
    f = FinetuneParams(epochs=2, batch_size=8, lr=float("inf"))
    augment = BatchAugment(AugmentConfig(size=32))
    with pytest.raises(TrainingDiverged, match=r"finetune seed 0 at epoch 1: the loss is nan.*finetune\.lr = inf"):
        finetune(backbone, pixels, labels, 2, f, augment, 0)


def test_poison_concentration_by_hand():
    assignment = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    poison = np.array([1, 1, 1, 0, 1, 0, 0, 0, 1, 1], dtype=bool)
    c = cluster.poison_concentration(assignment, poison)
    # clusters 0 (75%) and 2 (100%) are at least half poisoned: 5 of the 6 poisons
    assert c["rich_clusters"] == 2 and c["poison_share_in_rich_clusters"] == pytest.approx(5 / 6)
    assert c["largest_poison_share_one_cluster"] == pytest.approx(3 / 6) and c["max_cluster_purity"] == 1.0


def test_kmeans_finds_planted_clusters():
    rng = np.random.default_rng(0)
    x = np.repeat(np.eye(4, 8), 50, axis=0) + 0.01 * rng.normal(size=(200, 8))
    result = cluster.kmeans(x, 4, seed=0, restarts=5)
    groups = result.assignment.reshape(4, 50)
    assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 4
    assert np.allclose(np.linalg.norm(result.centroids, axis=1), 1, atol=1e-5)
