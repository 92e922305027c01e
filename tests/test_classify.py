"""Poison classifier: early stopping, proxy validation and pool, patch pasting; the filtered list's wiring."""

import numpy as np
import pytest
import torch

from helpers import classify, params
from helpers.classify import EarlyStopping, f1_score, paste_random_patches, proxy_validation, training_pool


def test_early_stopping_on_a_synthetic_f1_sequence():
    f1s = [0.10, 0.50, 0.551, 0.553, 0.559, 0.552, 0.60, 0.601, 0.605, 0.609]
    stopper = EarlyStopping(patience=3)
    stops = [stopper.update(f) for f in f1s]
    # int(100 F1): 10, 50, 55, 55, 55, 55 -> three unchanged evaluations after the first 55: stop at index 5
    assert stops.index(True) == 5
    stopper = EarlyStopping(patience=3)
    assert not any(stopper.update(f) for f in [0.1, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3])


def test_f1():
    assert f1_score(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == 0.5
    assert f1_score(np.zeros(4, int), np.zeros(4, int)) == 0.0


def test_proxy_validation_and_pool():
    ranking = np.array([7, 3, 9, 0, 1, 2, 4, 5, 6, 8])
    idx, labels = proxy_validation(ranking, 2)
    assert idx.tolist() == [7, 3, 6, 8] and labels.tolist() == [1, 1, 0, 0]
    pool = training_pool(ranking, 0.3, idx)  # top 30%: 7, 3, 9 out
    assert pool.tolist() == [0, 1, 2, 4, 5]
    assert training_pool(ranking, 0.3, idx, also_drop=np.array([1, 5, 7])).tolist() == [0, 2, 4]


def test_top_cluster_members_are_the_top_candidates_clusters(tmp_path, monkeypatch):
    """``classifier.exclude_top_clusters``: every image of a cluster a top candidate is in, and no other."""
    from helpers import classify, io

    io.save_npz(tmp_path / "clustering.npz", assignment=np.array([2, 0, 1, 2, 0, 3, 1, 2]))
    monkeypatch.setattr(classify, "cluster_stage", lambda params, variant, progress: tmp_path)
    assert classify.top_cluster_members(None, "poisoned", np.array([3, 6])).tolist() == [0, 2, 3, 6, 7]


def test_paste_random_patches_labels_what_it_pastes():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(200, 3, 32, 32)
    patches = torch.full((4, 3, 12, 12), 255, dtype=torch.uint8)
    out, labels = paste_random_patches(x.clone(), patches, 0.5, 12, g)
    touched = out.flatten(1).amax(1) > 0
    assert torch.equal(touched, labels.bool())
    assert 60 < labels.sum() < 140
    area = (out[:, 0] > 0).flatten(1).sum(1)[labels.bool()]
    assert area.min() >= 4 * 4 and area.max() <= 15 * 15  # sides in [w/3, 4w/3) = [4, 16)


def test_paste_scale_sets_the_pasted_sides():
    g = torch.Generator().manual_seed(1)
    patches = torch.full((2, 3, 12, 12), 255, dtype=torch.uint8)
    out, labels = paste_random_patches(torch.zeros(300, 3, 32, 32), patches, 0.5, 12, g, scale=(0.5, 1.0))
    sides = (out[:, 0] > 0).any(1).sum(1)[labels.bool()]  # rows touched = the pasted side
    assert sides.min() == 6 and sides.max() == 11  # [w/2, w) = [6, 12)


def test_natural_negatives_paste_windows_of_other_images_and_keep_the_papers_draws():
    patches = torch.full((2, 3, 12, 12), 255, dtype=torch.uint8)
    x = torch.arange(1, 301).float().div(1000).view(300, 1, 1, 1).expand(300, 3, 32, 32).contiguous()
    paper, labels = paste_random_patches(x.clone(), patches, 0.5, 12, torch.Generator().manual_seed(2))
    same, labels0 = paste_random_patches(x.clone(), patches, 0.5, 12, torch.Generator().manual_seed(2), negative_p=0.0)
    assert torch.equal(paper, same) and torch.equal(labels, labels0)  # negative_p = 0: the paper's draws, untouched
    out, labels1 = paste_random_patches(x.clone(), patches, 0.5, 12, torch.Generator().manual_seed(2), negative_p=1.0)
    assert torch.equal(labels1, labels)  # the labels still say only where a top-k patch went
    pasted = out[labels1.bool()]
    assert torch.equal(pasted, paper[labels.bool()])  # and those are pasted as before
    negatives = torch.nonzero(labels1 == 0)[:, 0]
    for i in negatives.tolist():
        values = out[i, 0].mul(1000).round().unique()  # resizing a flat window keeps its value, to rounding
        donor = x[(i + 1) % 300, 0, 0, 0].mul(1000).round()
        assert len(values) == 2 and (values == donor).any()  # a square of the next image's value
        assert (out[i, 0] != x[i, 0]).sum() >= 4 * 4  # a side of at least w/3
    assert not torch.equal(out[negatives], x[negatives])
    few, _ = paste_random_patches(x[:4].clone(), patches, 0.5, 12, torch.Generator().manual_seed(2), negative_p=1e-9)
    assert few.shape == (4, 3, 32, 32)  # a batch where no natural patch is drawn


def test_a_diverging_classifier_stops_and_names_its_keys():
    import dataclasses

    import pytest

    from helpers.classify import train_classifier
    from helpers.compute import TrainingDiverged
    from helpers.models import Normaliser
    from helpers.params import ClassifierParams

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (40, 3, 32, 32), generator=g, dtype=torch.uint8)
    patches = torch.randint(0, 256, (4, 3, 8, 8), generator=g, dtype=torch.uint8)
    val_idx, val_labels = np.arange(30, 40), np.r_[np.ones(5), np.zeros(5)].astype(np.int64)
    # width 8, the smallest the params allow: at 4, oneDNN's channels-last 1x1 convolution backward corrupted
    # memory on an AVX2 CPU (2026-12-08), and this test hung there
    cfg = dataclasses.replace(ClassifierParams(), width=8, batch_size=8, max_iters=6, eval_every=3)
    mean, std = (0.5,) * 3, (0.25,) * 3

    def train(lr):
        c = dataclasses.replace(cfg, lr=lr)
        return train_classifier(
            pixels, np.arange(30), patches, 8, val_idx, val_labels, c, mean, std, 0, Normaliser(mean, std)
        )

    with pytest.raises(TrainingDiverged, match=r"seed 0 at iteration 3: the loss is nan.*classifier\.lr = inf"):
        train(float("inf"))
    _, history = train(0.01)
    assert [h["iteration"] for h in history] == [3, 6] and all(np.isfinite(h["loss"]) for h in history)


def test_the_filtered_icutmix_model_uses_the_plain_defense(monkeypatch):
    """'PatchSearch + i-CutMix' retrains with i-CutMix on the list filtered with the plain model's defense."""
    seen = []
    monkeypatch.setattr(classify, "classifier_stage", lambda p, variant, progress: seen.append(p) or _raise())
    base = params.from_dict({"profile": "x", "ssl": {"icutmix": True}})
    with pytest.raises(KeyError):
        classify.kept_indices(base)
    assert seen[0].ssl.icutmix is False and seen[0].search == base.search


def _raise():
    raise KeyError("stop")


def test_the_cluster_vote_keeps_the_removals_of_clusters_removed_by_a_majority():
    """Cluster 0 is removed 3 of 4 (kept: a majority), cluster 1 exactly half (dropped: not more than half),
    cluster 2 one of 3 (dropped); what the ensemble kept stays kept."""
    assignment = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    removed = np.array([1, 1, 1, 0, 1, 0, 1, 0, 0], dtype=bool)
    voted = classify.cluster_vote(removed, assignment)
    assert voted.tolist() == [True, True, True, False, False, False, False, False, False]
    assert not (voted & ~removed).any()
    # a cluster number with no image (k-means left it empty) divides by nothing
    assert classify.cluster_vote(np.array([True, True]), np.array([2, 2])).tolist() == [True, True]
