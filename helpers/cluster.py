"""k-means of L2-normalised embeddings: faiss (GPU when there is one, CPU otherwise), or the same algorithm in
torch where faiss is not installed (the GPU machine's image has none: ``kmeans_torch``, checked against faiss
in ``tests/test_cluster.py``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass
class Clustering:
    centroids: np.ndarray  # k x D, L2-normalised
    assignment: np.ndarray  # N, cluster index of each embedding
    distance: np.ndarray  # N, squared distance to its centroid
    backend: str = "faiss"  # faiss | torch: which implementation made it


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def content_ids(pixels: np.ndarray, seed: int) -> np.ndarray:
    """A 64-bit id of each image (``N x ...`` uint8) from its pixels alone: a keyed hash (BLAKE2b, key
    ``seed``). Sorting by it gives a random order of the images that is the same whatever order the files or
    classes come in: the order in which the defense draws and breaks ties (``cluster.order: content``).
    Identical images share an id; a stable sort keeps them in file order."""
    key = int(seed).to_bytes(8, "little", signed=True)
    rows = np.ascontiguousarray(pixels, dtype=np.uint8)
    digests = b"".join(hashlib.blake2b(row.tobytes(), digest_size=8, key=key).digest() for row in rows)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def kmeans(
    features: np.ndarray, k: int, seed: int = 0, iterations: int = 20, restarts: int = 1, gpu: bool | None = None
) -> Clustering:
    """faiss k-means (20 iterations, one start, as in the official code) on L2-normalised features;
    ``restarts`` > 1 keeps the best of several random starts. Where faiss is not installed, ``kmeans_torch``."""
    x = l2_normalise(features)
    if k > len(x):
        raise ValueError(f"cannot make {k} clusters of {len(x)} embeddings: lower the number of clusters")
    try:
        import faiss
    except ImportError:
        return min(
            (kmeans_torch(x, k, seed + r, iterations) for r in range(restarts)), key=lambda c: float(c.distance.sum())
        )
    use_gpu = (faiss.get_num_gpus() > 0) if gpu is None else gpu
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iterations,
        nredo=restarts,
        seed=seed,
        gpu=use_gpu,
        verbose=False,
        max_points_per_centroid=max(256, len(x) // k + 1),
    )
    km.train(x)
    centroids = l2_normalise(km.centroids)
    distance, assignment = km.index.search(x, 1)
    return Clustering(centroids, assignment[:, 0].astype(np.int64), distance[:, 0])


def kmeans_torch(features: np.ndarray, k: int, seed: int = 0, iterations: int = 20, device=None) -> Clustering:
    """Lloyd's k-means as faiss runs it, in torch on the run's device: ``k`` distinct training points drawn
    with ``seed`` as the first centres, then ``iterations`` rounds of assigning each point to its nearest
    centre (squared L2) and moving each centre to the mean of its points; a centre left with no point is
    restarted from the largest cluster's centre, the two nudged apart (faiss's split of empty clusters).
    The centres returned are L2-normalised, the assignment and distances those to the last centres."""
    import torch

    from .compute import device_for_run

    device = torch.device(device) if device is not None else device_for_run()
    x = torch.as_tensor(l2_normalise(features), device=device)
    n = len(x)
    if k > n:
        raise ValueError(f"cannot make {k} clusters of {n} embeddings: lower the number of clusters")
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(n, generator=g)[:k].to(device)].clone()

    def nearest(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        best, where = [], []
        sq = (c * c).sum(1)
        for chunk in x.split(8192):  # N x k distances a block at a time
            d = (chunk * chunk).sum(1, keepdim=True) - 2 * chunk @ c.T + sq
            value, index = d.min(1)
            best.append(value.clamp_min(0))
            where.append(index)
        return torch.cat(where), torch.cat(best)

    for _ in range(iterations):
        assignment, _ = nearest(centres)
        counts = torch.bincount(assignment, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assignment, x)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None].to(x.dtype)
        for j in torch.nonzero(~filled).flatten().tolist():  # faiss: split the largest cluster in two
            big = int(torch.argmax(counts))
            centres[j] = centres[big] * (1 + 1e-3)
            centres[big] = centres[big] * (1 - 1e-3)
            counts[j] = counts[big] // 2
            counts[big] -= counts[j]
    assignment, distance = nearest(centres)
    return Clustering(
        l2_normalise(centres.cpu().numpy()), assignment.cpu().numpy().astype(np.int64), distance.cpu().numpy(), "torch"
    )


def inertia(features: np.ndarray, clustering: Clustering) -> float:
    """Sum of squared L2 distances of the L2-normalised features to their (normalised) centres."""
    x = l2_normalise(features)
    return float(((x - clustering.centroids[clustering.assignment]) ** 2).sum())


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
