"""k-means of L2-normalised embeddings with faiss (GPU when there is one, CPU otherwise)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Clustering:
    centroids: np.ndarray  # k x D, L2-normalised
    assignment: np.ndarray  # N, cluster index of each embedding
    distance: np.ndarray  # N, squared distance to its centroid


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def kmeans(
    features: np.ndarray, k: int, seed: int = 0, iterations: int = 20, restarts: int = 1, gpu: bool | None = None
) -> Clustering:
    """faiss k-means (20 iterations, one start, as in the official code) on L2-normalised features;
    ``restarts`` > 1 keeps the best of several random starts."""
    import faiss

    x = l2_normalise(features)
    if k > len(x):
        raise ValueError(f"cannot make {k} clusters of {len(x)} embeddings: lower the number of clusters")
    use_gpu = (faiss.get_num_gpus() > 0) if gpu is None else gpu
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iterations,
        seed=seed,
        gpu=use_gpu,
        verbose=False,
        max_points_per_centroid=max(256, len(x) // k + 1),
    )
    km.train(x)
    centroids = l2_normalise(km.centroids)
    distance, assignment = km.index.search(x, 1)
    return Clustering(centroids, assignment[:, 0].astype(np.int64), distance[:, 0])


def poison_concentration(assignment: np.ndarray, poison_mask: np.ndarray, threshold: float = 0.5) -> dict:
    """How concentrated the poisons are in the clusters (ground truth: for evaluation and teaching only).

    Returns the share of poisons that sit in clusters at least ``threshold`` poisoned, the number of such
    clusters, and the largest share of all poisons in one cluster."""
    k = int(assignment.max()) + 1
    sizes = np.bincount(assignment, minlength=k)
    poisons = np.bincount(assignment, weights=poison_mask.astype(float), minlength=k)
    purity = poisons / np.maximum(sizes, 1)
    rich = purity >= threshold
    total = max(poison_mask.sum(), 1)
    return {
        "poison_share_in_rich_clusters": float(poisons[rich].sum() / total),
        "rich_clusters": int(rich.sum()),
        "largest_poison_share_one_cluster": float(poisons.max() / total),
        "max_cluster_purity": float(purity.max()),
    }
