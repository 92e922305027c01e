"""The defense does not depend on the order of the classes or the files (issue 22, ``cluster.order``).

A toy defense runs the real kernels (k-means, flip set, iterative search, ranking, proxy validation,
training pool) on 6 classes of 8 x 8 images, the target class last, with poison scores full of ties: the
poisons and every image of the first class score 3, the rest 0. Run on the files in class order and in
reversed class order, ``content`` ids give the same detection metrics and the same images at every step;
``file`` order (index ties, what the shipped CPU results used) gives the first classes every tie, so its
top-10 accuracy swings from 20% to 80% with the order of the classes.
"""

import numpy as np
import pytest

from helpers.classify import proxy_validation, training_pool
from helpers.cluster import content_ids, flip_set, kmeans, l2_normalise
from helpers.search import iterative_search, top_k_accuracy

N_CLASSES, PER_CLASS, TARGET = 6, 40, 5


def _toy_set():
    rng = np.random.default_rng(0)
    means = rng.integers(30, 220, size=(N_CLASSES, 3, 1, 1))
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    pixels = np.clip(means[labels] + rng.normal(0, 12, (len(labels), 3, 8, 8)), 0, 255).astype(np.uint8)
    poison = (labels == TARGET) & (np.arange(len(labels)) % 2 == 0)
    pixels[poison, :, 2:5, 2:5] = 255  # the trigger: a white 3 x 3 square
    return pixels, labels, poison


def _defend(pixels, labels, poison, order):
    """The defense's steps on files in this order; every output in image terms (the input's indices)."""
    ids = content_ids(pixels, seed=0) if order == "content" else np.arange(len(pixels))
    proj = np.random.default_rng(1).normal(size=(3 * 8 * 8, 16)).astype(np.float32)
    feats = l2_normalise(pixels.reshape(len(pixels), -1).astype(np.float32) @ proj)
    visit = np.argsort(ids, kind="stable")
    centroids = kmeans(feats[visit], N_CLASSES, seed=0).centroids
    assignment = np.argmax(feats @ centroids.T, axis=1)
    flips = flip_set(feats, assignment, centroids)
    tied = poison | (labels == 0)  # the poisons and every image of the first class score 3
    result = iterative_search(assignment, lambda idx: 3.0 * tied[idx], 2, 0.25, seed=0, ids=ids)
    ranking = result.ranking()
    val_idx, _ = proxy_validation(ranking[result.scored[ranking]], 10)
    pool = training_pool(ranking, 0.1, val_idx, ids)
    return {
        "top-10 acc": top_k_accuracy(ranking, poison, 10),
        "proxy negatives that are poisons": int(poison[val_idx[10:]].sum()),
        "poisons in the pool": int(poison[pool].sum()),
        "flip set": flips,
        "ranking": ranking,
        "pool": pool,
    }


def _run(order, reverse):
    pixels, labels, poison = _toy_set()
    if not reverse:
        return _defend(pixels, labels, poison, order)
    files = np.argsort(-labels, kind="stable")  # the classes in reversed order, files within a class kept
    out = _defend(pixels[files], labels[files], poison[files], order)
    for key in ("flip set", "ranking", "pool"):  # back to the first run's indices
        out[key] = files[out[key]]
    return out


def test_content_order_gives_the_same_defense_whatever_the_class_order():
    a, b = _run("content", False), _run("content", True)
    for key in ("top-10 acc", "proxy negatives that are poisons", "poisons in the pool"):
        assert a[key] == b[key], key
    assert sorted(a["flip set"].tolist()) == sorted(b["flip set"].tolist())
    assert np.array_equal(a["ranking"], b["ranking"])  # the same images in the same order, ties included
    assert np.array_equal(a["pool"], b["pool"])  # the order the classifier draws from, too
    assert 0 < a["top-10 acc"] < 1  # the 60 tied images are mixed: neither class order's extreme


def test_file_order_hands_every_tie_to_the_first_classes():
    forward, reverse = _run("file", False), _run("file", True)
    assert forward["top-10 acc"] <= 0.2  # class 0's tied images come first
    assert reverse["top-10 acc"] >= 0.8  # with the target's class first, its poisons do
    assert forward["poisons in the pool"] != reverse["poisons in the pool"]  # the exclusion's ties too


def test_content_ids_follow_the_pixels_not_the_place():
    pixels, _, _ = _toy_set()
    ids = content_ids(pixels, seed=0)
    assert ids.dtype == np.uint64 and len(np.unique(ids)) == len(ids)
    files = np.random.default_rng(3).permutation(len(pixels))
    assert np.array_equal(content_ids(pixels[files], seed=0), ids[files])
    other = content_ids(pixels, seed=1)
    assert not np.array_equal(np.argsort(other), np.argsort(ids))  # the seed draws another order
    assert len(content_ids(pixels[:0], seed=0)) == 0


@pytest.mark.parametrize("value", ["index", "", None])
def test_cluster_order_is_checked(value):
    from helpers.params import ParamsError, from_dict

    with pytest.raises(ParamsError, match=r"'cluster.order'"):
        from_dict({"profile": "x", "cluster": {"order": value}}, "src")
