"""Poison scores by the flip test, and PatchSearch's iterative search over clusters.

- Flip-test set: for every cluster, the training image nearest its centre (hard to flip).
- Poison score of a candidate trigger from an image of cluster y: paste it at a uniformly random place
  on every flip-test image, and count the flip-test images assigned to y after pasting minus before.
  The assignment is the argmax of the cosine logits; with L2-normalised centres that argmax does not
  depend on the feature's norm, so the official code's quirk (patched features left unnormalised) does
  not arise here.
- The flip test is batched over candidates and flip images together (``flip_test``): C candidates x F
  flip images are pasted with one kernel call per chunk and forwarded in large batches.
  ``flip_test_loop`` is the official code's order (one candidate at a time, its F pasted images in one
  batch), kept as the reference for the tests and ``make bench``. Both draw the paste locations from
  ``paste_locations``, seeded per candidate image, so both give the same scores for the same seed, and an
  image's score does not depend on which other images are scored with it.
- Iterative search (``iterative_search``): each round, every surviving cluster gives ``s`` random
  unscored images; a cluster's score is the highest score of its images so far; then the
  ``ceil(r * surviving)`` lowest-scored clusters are pruned (ties: lower cluster index first), and
  clusters with no unscored image left drop out. It stops when no cluster is left. Unscored images keep
  score 0; the ranking puts scored images before unscored ones at equal score.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .cam import ClusterClassifier, assign
from .kernels import paste_patches


def flip_set(features: np.ndarray, assignment: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Indices of the flip-test set: per non-empty cluster, the member with the largest cosine to its centre."""
    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    c = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    cos = (f * c[assignment]).sum(1)
    chosen = []
    for k in np.unique(assignment):
        members = np.flatnonzero(assignment == k)
        chosen.append(members[np.argmax(cos[members])])
    return np.array(chosen, dtype=np.int64)


def paste_locations(image_ids, n_flip: int, height: int, width: int, w: int, seed: int) -> torch.Tensor:
    """``C x F x 2`` top-left ``(x, y)`` corners, uniform over the image, seeded by ``(seed, image id)``."""
    out = np.zeros((len(image_ids), n_flip, 2), dtype=np.int64)
    for row, image_id in enumerate(image_ids):
        rng = np.random.default_rng([seed, int(image_id)])
        out[row, :, 0] = rng.integers(0, width - w + 1, size=n_flip)
        out[row, :, 1] = rng.integers(0, height - w + 1, size=n_flip)
    return torch.from_numpy(out)


@torch.no_grad()
def flip_test(
    model: ClusterClassifier,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    flip_pixels: torch.Tensor,
    flip_before: torch.Tensor,
    patches: torch.Tensor,
    clusters: torch.Tensor,
    locations: torch.Tensor,
    batch_size: int = 2048,
) -> np.ndarray:
    """Poison scores of ``C`` candidate patches (``C x 3 x w x w`` uint8) from images of ``clusters``,
    batched over candidates and flip images together."""
    n_cand, n_flip = len(patches), len(flip_pixels)
    if n_cand == 0:
        return np.zeros(0, dtype=np.int64)
    clusters = clusters.long().cpu()
    cand = torch.arange(n_cand).repeat_interleave(n_flip)
    flip = torch.arange(n_flip).repeat(n_cand)
    xs, ys = locations[:, :, 0].reshape(-1), locations[:, :, 1].reshape(-1)
    after = torch.zeros(n_cand, dtype=torch.long)
    for start in range(0, len(cand), batch_size):
        c, f = cand[start : start + batch_size], flip[start : start + batch_size]
        pasted = paste_patches(
            flip_pixels[f], patches[c], xs[start : start + batch_size], ys[start : start + batch_size]
        )
        hit = (assign(model, normalise(pasted), batch_size).cpu() == clusters[c]).long()
        after.index_add_(0, c, hit)
    before = (flip_before.cpu()[None, :] == clusters[:, None]).sum(1)
    return (after - before).numpy()


@torch.no_grad()
def flip_test_loop(
    model: ClusterClassifier,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    flip_pixels: torch.Tensor,
    flip_before: torch.Tensor,
    patches: torch.Tensor,
    clusters: torch.Tensor,
    locations: torch.Tensor,
) -> np.ndarray:
    """The reference: one candidate at a time, its flip images pasted one by one and forwarded together."""
    scores = np.zeros(len(patches), dtype=np.int64)
    for c in range(len(patches)):
        pasted = flip_pixels.clone()
        for f in range(len(pasted)):
            x, y = int(locations[c, f, 0]), int(locations[c, f, 1])
            w = patches.shape[-1]
            pasted[f, :, y : y + w, x : x + w] = patches[c]
        after = assign(model, normalise(pasted), len(pasted)).cpu()
        target = int(clusters[c])
        scores[c] = int((after == target).sum()) - int((flip_before.cpu() == target).sum())
    return scores


def prune_count(n_alive: int, fraction: float) -> int:
    """Clusters pruned after a round: ``ceil(fraction * n_alive)`` (so the search always ends)."""
    return min(n_alive, math.ceil(fraction * n_alive - 1e-9))


@dataclass
class SearchResult:
    scores: np.ndarray  # N, poison score (0 where unscored)
    scored: np.ndarray  # N, bool
    rounds: list[dict] = field(default_factory=list)  # per round: clusters alive, images scored

    def ranking(self) -> np.ndarray:
        """All image indices, most poisonous first (scored before unscored at equal score, then index)."""
        return np.lexsort((np.arange(len(self.scores)), ~self.scored, -self.scores))


def iterative_search(
    assignment: np.ndarray,
    score_fn: Callable[[np.ndarray], np.ndarray],
    samples_per_cluster: int = 2,
    prune_fraction: float = 0.25,
    seed: int = 0,
    progress: Callable[[dict], None] | None = None,
) -> SearchResult:
    """PatchSearch's search: ``score_fn(indices) -> scores`` is called once per round on all new images."""
    if samples_per_cluster < 1 or not 0 < prune_fraction <= 1:
        raise ValueError(
            f"need samples_per_cluster >= 1 and prune_fraction in (0, 1], got {samples_per_cluster}, {prune_fraction}"
        )
    n = len(assignment)
    rng = np.random.default_rng(seed)
    k = int(assignment.max()) + 1 if n else 0
    order = {c: rng.permutation(np.flatnonzero(assignment == c)) for c in range(k)}
    alive = [c for c in range(k) if len(order[c])]
    pointer = dict.fromkeys(alive, 0)
    cluster_score = np.full(k, -np.inf)
    scores, scored = np.zeros(n, dtype=np.float64), np.zeros(n, dtype=bool)
    rounds = []
    while alive:
        picked = {c: order[c][pointer[c] : pointer[c] + samples_per_cluster] for c in alive}
        batch = np.concatenate([picked[c] for c in alive])
        new = np.asarray(score_fn(batch), dtype=np.float64)
        scores[batch], scored[batch] = new, True
        for c in alive:
            pointer[c] += len(picked[c])
            cluster_score[c] = max(cluster_score[c], scores[picked[c]].max())
        n_prune = prune_count(len(alive), prune_fraction)
        ranked = sorted(alive, key=lambda c: (cluster_score[c], c))
        survivors = [c for c in ranked[n_prune:] if pointer[c] < len(order[c])]
        info = {"round": len(rounds), "clusters": len(alive), "scored": len(batch), "pruned": n_prune}
        rounds.append(info)
        if progress is not None:
            progress(info)
        alive = sorted(survivors)
    return SearchResult(scores, scored, rounds)


def relative_std(scores: np.ndarray) -> float:
    """RSD = std / mean of a population of poison scores (nan where the mean is not positive)."""
    scores = np.asarray(scores, dtype=np.float64)
    mean = scores.mean() if len(scores) else 0.0
    return float(scores.std() / mean) if mean > 0 else float("nan")


def top_k_accuracy(ranking: np.ndarray, poison_mask: np.ndarray, k: int = 20) -> float:
    """Share of poisons among the ``k`` top-ranked images (ground truth: for evaluation only)."""
    return float(poison_mask[ranking[:k]].mean())
