"""k-means of L2-normalised embeddings: faiss (GPU when there is one, CPU otherwise), or the same algorithm in
torch where faiss is not installed (the GPU machine's image has none: ``kmeans_torch``, checked against faiss
in ``tests/test_cluster.py``).

Notebook 03's stage ``cluster_stage``: the whole training set's features from the model trained on
it, clustered; the flip-test set (``flip_set``) and each cluster's outlier statistics
(``cluster_outlier_stats``, PoisonCAM's) are computed from the clustering and saved with it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import io
from .attack import poisoned_train_pixels, run_attack
from .cache import cached_stage
from .compute import device_for_run
from .data import ImageList, load_data
from .models import extract_features
from .params import Params
from .ssl import augment_config, load_backbone, train_stage


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


@torch.no_grad()
def cluster_outlier_stats(features: np.ndarray, assignment: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Per cluster, the mean and std of its members' cosine distance to its centre (``k x 2``)."""
    f = F.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1)
    c = F.normalize(torch.as_tensor(centroids, dtype=torch.float32), dim=1)
    a = torch.as_tensor(assignment, dtype=torch.long)
    d = 1 - (f * c[a]).sum(1)
    k = len(c)
    count = torch.bincount(a, minlength=k).clamp_min(1).double()
    mean = torch.zeros(k, dtype=torch.float64).index_add_(0, a, d.double()) / count
    var = torch.zeros(k, dtype=torch.float64).index_add_(0, a, (d.double() - mean[a]) ** 2) / count
    std = var.sqrt()
    std[std == 0] = float(std[std > 0].mean()) if (std > 0).any() else 1.0
    return torch.stack([mean, std], 1).float().numpy()


VARIANTS = ("poisoned", "clean")


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")


def training_set(params: Params, variant: str, progress: bool = False) -> tuple[torch.Tensor, ImageList]:
    """The training set the defense inspects: its pixels and its file list."""
    data = load_data(params, progress=progress)
    if variant == "clean":
        return data.train.tensor(), data.train.images
    attack = run_attack(params, data, progress)
    return poisoned_train_pixels(data, attack, params.data.image_size), attack.train_poisoned


def defense_ids(params: Params, pixels: torch.Tensor) -> np.ndarray:
    """The ids in whose order the defense draws images and breaks ties (``cluster.order``): a seeded hash
    of each image's pixels (``content``), or its index in the file list (``file``)."""
    if params.cluster.order == "file":
        return np.arange(len(pixels), dtype=np.int64)
    return content_ids(pixels.numpy(), params.cluster.seed)


def training_features(params: Params, variant: str = "poisoned", progress: bool = False) -> np.ndarray:
    """L2-normalised features of the whole training set from the model trained on it: what the clustering
    stage clusters (notebook 03 extracts them again where a shipped clustering leaves them out)."""
    pixels, _ = training_set(params, variant, progress)
    size = pixels.shape[-1]
    backbone = load_backbone(params, train_stage(params, variant, progress=progress), size)
    cfg = augment_config(params.ssl, size)
    batch, precision = params.cluster.batch_size, params.compute.precision
    return l2_normalise(extract_features(backbone, pixels, cfg.mean, cfg.std, batch, progress, "features", precision))


def cluster_stage(params: Params, variant: str = "poisoned", progress: bool = True) -> Path:
    """Features of the whole training set (L2-normalised) and their k-means clustering. The assignment
    saved is the argmax of the cosine classifier of the centres, the one the search uses throughout."""
    check_variant(variant)
    train_stage(params, variant, progress=progress)  # the model first: a hit below still records it as used

    def compute(out: Path, final: Path) -> None:
        start = time.perf_counter()
        feats = training_features(params, variant, progress)
        visit = np.argsort(defense_ids(params, training_set(params, variant)[0]), kind="stable")
        clustering = kmeans(feats[visit], params.cluster.k, params.cluster.seed, params.cluster.iterations)
        assignment = np.argmax(feats @ clustering.centroids.T, axis=1)
        io.save_npz(
            out / "clustering.npz",
            features=feats,
            centroids=clustering.centroids,
            assignment=assignment,
            flip_idx=flip_set(feats, assignment, clustering.centroids),
            outlier_stats=cluster_outlier_stats(feats, assignment, clustering.centroids),
        )
        summary = {"seconds": time.perf_counter() - start, "n": len(feats)}
        if clustering.backend != "faiss":  # where faiss is missing (the GPU image), say what clustered instead
            summary["kmeans"] = clustering.backend
        io.write_json(out / "summary.json", summary)

    return cached_stage(f"cluster_{variant}", params, compute).path
