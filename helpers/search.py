"""Poison scores by the flip test, and PatchSearch's iterative search over clusters.

- Flip-test set: for every cluster, the training image nearest its centre (hard to flip).
- Poison score of a candidate trigger from an image of cluster y: paste it at a uniformly random place
  on every flip-test image and count flip-test images, by one of five rules (``SCORE_RULES``):
  * ``into`` (PatchSearch, Sec. 3: "the number of images in X^f whose cluster assignments flipped to that
    of x_i"): images not in y before pasting and in y after. A count, never negative. (The official code
    counts the flip images in y after minus before, which is -1 for a candidate that pushes y's own flip
    image out; that difference is not used here.)
  * ``changed`` (PoisonCAM, Sec. 5.5: "the number of images in X^f whose cluster assignments are changed
    after pasting the candidate trigger"): images whose assignment differs after pasting, in any
    direction.
  * ``into_vs_flat`` and ``changed_vs_flat``: the same counts with a control for occlusion. Each
    candidate is pasted a second time, at the same places, as a flat square of its own mean colour; a flip
    image counts only where the candidate's *pattern* is needed: ``into_vs_flat`` counts it if it moves
    into y and the flat square does not send it to y; ``changed_vs_flat`` if it changes cluster and lands
    elsewhere than where the flat square sends it. At 32 px a flip image sits close to a second cluster
    (median cosine gap 0.044 on the cifar10 profile), so covering an eighth of it with anything moves it:
    the literal ``changed`` count ranks almost blank squares above the trigger. A flat square has the same
    size, place and colour as the candidate and none of its pattern, so what it moves too is discounted.
    It doubles the flip test's forward passes.
  * ``toward_vs_flat``: ``into_vs_flat`` widened from y to its neighbourhood. A flip image counts if the
    candidate moves it to a cluster whose centre is nearer y's centre (cosine) than both the cluster it was
    in and the one the flat square sends it to; a move into y itself is the nearest of all. k-means splits
    the poisons of one target into several clusters (nine on the cifar10 profile's ``automobile-21``), and a
    trigger drags the flip images towards all of them, not only into the candidate's own: ``into`` counts a
    ninth of that pull, ``toward_vs_flat`` all of it. No parameter: the centres say what is near.
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
  score 0; the ranking puts scored images before unscored ones at equal score, then follows the images'
  ids (``cluster.order``: a seeded hash of their content, so ties never favour a class). The first
  round's images depend on the seed and the clustering only, not on the scores: every window side scores the same
  first-round images, the common population the blind choice of ``w`` compares (``choose_window``).
- Blind window side (``WINDOW_RULES``): ``rsd`` (the paper) and ``contrast`` are statistics of the first
  round's scores (``window_statistic``); ``agreement`` asks whether the top candidates' windows send the
  flip images to the same cluster more than random windows of the same images do
  (``destination_agreement``, computed by ``Scorer.agreement``); ``pooled`` asks the same question pooled
  over the pairs and averaged over several draws of paste places and random windows
  (``pooled_agreement``). ``pick_window`` takes the largest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import io
from .cache import resumable_stage
from .cluster import check_variant, cluster_stage, defense_ids, training_set
from .compute import device_for_run
from .data import ImageList
from .kernels import paste_patches
from .localize import (
    ClusterClassifier,
    assign,
    best_windows,
    cut_patches,
    grad_cam_batched,
    make_masks,
    poisoncam_heatmaps,
)
from .models import Normaliser
from .params import Params
from .ssl import augment_config, load_backbone, train_stage

SCORE_RULES = ("into", "changed", "into_vs_flat", "changed_vs_flat", "toward_vs_flat")


def _check_rule(rule: str) -> None:
    if rule not in SCORE_RULES:
        raise ValueError(f"poison score rule must be one of {', '.join(SCORE_RULES)}, got {rule!r}")


def flat_patches(patches: torch.Tensor) -> torch.Tensor:
    """Each ``C x 3 x w x w`` uint8 patch as a flat square of its own mean colour (the occlusion control)."""
    mean = patches.float().mean((2, 3), keepdim=True).round().to(torch.uint8)
    return mean.expand_as(patches).contiguous()


def _flip_hits(
    before: torch.Tensor,
    after: torch.Tensor,
    clusters: torch.Tensor,
    rule: str,
    flat: torch.Tensor | None = None,
    centres: torch.Tensor | None = None,
) -> torch.Tensor:
    """1 where a flip image counts towards its candidate's score (``before``/``after``/``clusters``, and
    ``flat``, the destinations under the flat control, broadcast; ``centres``, the L2-normalised cluster
    centres, for ``toward_vs_flat``)."""
    if rule == "toward_vs_flat":
        near = (centres @ centres.T).cpu()  # cosine between cluster centres
        own = clusters.expand_as(after)

        def nearness(dest: torch.Tensor) -> torch.Tensor:
            return near[dest.expand_as(after), own]

        return ((nearness(after) > nearness(before)) & (nearness(after) > nearness(flat))).long()
    if rule.startswith("into"):
        hit = (after == clusters) & (before != clusters)
        return (hit & (flat != clusters) if rule == "into_vs_flat" else hit).long()
    hit = after != before
    return (hit & (after != flat) if rule == "changed_vs_flat" else hit).long()


def paste_locations(image_ids, n_flip: int, height: int, width: int, w: int, seed: int) -> torch.Tensor:
    """``C x F x 2`` top-left ``(x, y)`` corners, uniform over the image, seeded by ``(seed, image id)``."""
    out = np.zeros((len(image_ids), n_flip, 2), dtype=np.int64)
    for row, image_id in enumerate(image_ids):
        rng = np.random.default_rng([seed, int(image_id)])
        out[row, :, 0] = rng.integers(0, width - w + 1, size=n_flip)
        out[row, :, 1] = rng.integers(0, height - w + 1, size=n_flip)
    return torch.from_numpy(out)


@torch.no_grad()
def flip_destinations(
    model: ClusterClassifier,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    flip_pixels: torch.Tensor,
    patches: torch.Tensor,
    locations: torch.Tensor,
    batch_size: int = 2048,
) -> torch.Tensor:
    """``C x F`` cluster assignments of the ``F`` flip images after pasting each of ``C`` patches (``C x 3 x w x
    w`` uint8) at ``locations`` (``C x F x 2`` corners), batched over candidates and flip images together."""
    n_cand, n_flip = len(patches), len(flip_pixels)
    after = torch.empty(n_cand * n_flip, dtype=torch.long)
    cand = torch.arange(n_cand).repeat_interleave(n_flip)
    flip = torch.arange(n_flip).repeat(n_cand)
    xs, ys = locations[:, :, 0].reshape(-1), locations[:, :, 1].reshape(-1)
    for start in range(0, len(cand), batch_size):
        c, f = cand[start : start + batch_size], flip[start : start + batch_size]
        pasted = paste_patches(
            flip_pixels[f], patches[c], xs[start : start + batch_size], ys[start : start + batch_size]
        )
        after[start : start + len(c)] = assign(model, normalise(pasted), batch_size).cpu()
    return after.view(n_cand, n_flip)


def flip_test(
    model: ClusterClassifier,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    flip_pixels: torch.Tensor,
    flip_before: torch.Tensor,
    patches: torch.Tensor,
    clusters: torch.Tensor,
    locations: torch.Tensor,
    batch_size: int = 2048,
    rule: str = "into",
) -> np.ndarray:
    """Poison scores of ``C`` candidate patches (``C x 3 x w x w`` uint8) from images of ``clusters``,
    batched over candidates and flip images together; ``rule``: one of ``SCORE_RULES`` (module text)."""
    _check_rule(rule)
    if len(patches) == 0:
        return np.zeros(0, dtype=np.int64)
    after = flip_destinations(model, normalise, flip_pixels, patches, locations, batch_size)
    flat = None
    if rule.endswith("_vs_flat"):
        flat = flip_destinations(model, normalise, flip_pixels, flat_patches(patches), locations, batch_size)
    before, own = flip_before.long().cpu()[None], clusters.long().cpu()[:, None]
    hits = _flip_hits(before, after, own, rule, flat, model.centroids.float())
    return hits.sum(1).numpy()


@torch.no_grad()
def flip_test_loop(
    model: ClusterClassifier,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    flip_pixels: torch.Tensor,
    flip_before: torch.Tensor,
    patches: torch.Tensor,
    clusters: torch.Tensor,
    locations: torch.Tensor,
    rule: str = "into",
) -> np.ndarray:
    """The reference: one candidate at a time, its flip images pasted one by one and forwarded together."""
    _check_rule(rule)
    scores = np.zeros(len(patches), dtype=np.int64)
    w = patches.shape[-1]

    def destinations(patch: torch.Tensor, c: int) -> list[int]:
        pasted = flip_pixels.clone()
        for f in range(len(pasted)):
            x, y = int(locations[c, f, 0]), int(locations[c, f, 1])
            pasted[f, :, y : y + w, x : x + w] = patch
        return assign(model, normalise(pasted), len(pasted)).cpu().tolist()

    before = flip_before.long().cpu().tolist()
    near = (model.centroids.float() @ model.centroids.float().T).cpu().tolist()
    for c in range(len(patches)):
        after, target = destinations(patches[c], c), int(clusters[c])
        flat = destinations(patches[c].float().mean((1, 2), keepdim=True).round().to(torch.uint8), c)
        for a, b, f in zip(after, before, flat, strict=True):
            if rule == "toward_vs_flat":
                scores[c] += near[a][target] > near[b][target] and near[a][target] > near[f][target]
            elif rule.startswith("into"):
                scores[c] += a == target and b != target and (rule == "into" or f != target)
            else:
                scores[c] += a != b and (rule == "changed" or a != f)
    return scores


def prune_count(n_alive: int, fraction: float) -> int:
    """Clusters pruned after a round: ``ceil(fraction * n_alive)`` (so the search always ends)."""
    return min(n_alive, math.ceil(fraction * n_alive - 1e-9))


@dataclass
class SearchResult:
    scores: np.ndarray  # N, poison score (0 where unscored)
    scored: np.ndarray  # N, bool
    rounds: list[dict] = field(default_factory=list)  # per round: clusters alive, images scored
    round_of: np.ndarray | None = None  # N, the round that scored each image (-1: unscored)
    ids: np.ndarray | None = None  # N, the order ties are broken in (``cluster.defense_ids``); None: index

    def ranking(self) -> np.ndarray:
        """All image indices, most poisonous first: scored before unscored at equal score, then by ``ids``
        (``cluster.order``'s: under ``content`` a seeded order of the images' content, so that no class or file
        wins the ties; under ``file`` the index in the file list, sorted by class, so the first classes win
        them), then by index."""
        ids = np.arange(len(self.scores)) if self.ids is None else self.ids
        return np.lexsort((np.arange(len(self.scores)), ids, ~self.scored, -self.scores))


def iterative_search(
    assignment: np.ndarray,
    score_fn: Callable[[np.ndarray], np.ndarray],
    samples_per_cluster: int = 2,
    prune_fraction: float = 0.25,
    seed: int = 0,
    progress: Callable[[dict], None] | None = None,
    ids: np.ndarray | None = None,
) -> SearchResult:
    """PatchSearch's search: ``score_fn(indices) -> scores`` is called once per round on all new images.
    Each cluster's images are drawn in a seeded random order of their ``ids`` (default: their indices)."""
    if samples_per_cluster < 1 or not 0 < prune_fraction <= 1:
        raise ValueError(
            f"need samples_per_cluster >= 1 and prune_fraction in (0, 1], got {samples_per_cluster}, {prune_fraction}"
        )
    n = len(assignment)
    rng = np.random.default_rng(seed)
    k = int(assignment.max()) + 1 if n else 0
    members = {c: np.flatnonzero(assignment == c) for c in range(k)}
    if ids is not None:
        members = {c: m[np.argsort(ids[m], kind="stable")] for c, m in members.items()}
    order = {c: rng.permutation(members[c]) for c in range(k)}
    alive = [c for c in range(k) if len(order[c])]
    pointer = dict.fromkeys(alive, 0)
    cluster_score = np.full(k, -np.inf)
    scores, scored = np.zeros(n, dtype=np.float64), np.zeros(n, dtype=bool)
    round_of = np.full(n, -1, dtype=np.int64)
    rounds = []
    while alive:
        picked = {c: order[c][pointer[c] : pointer[c] + samples_per_cluster] for c in alive}
        batch = np.concatenate([picked[c] for c in alive])
        new = np.asarray(score_fn(batch), dtype=np.float64)
        scores[batch], scored[batch], round_of[batch] = new, True, len(rounds)
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
    return SearchResult(scores, scored, rounds, round_of, ids)


def relative_std(scores: np.ndarray) -> float:
    """RSD = std / mean of a population of poison scores (nan where the mean is not positive)."""
    scores = np.asarray(scores, dtype=np.float64)
    mean = scores.mean() if len(scores) else 0.0
    return float(scores.std() / mean) if mean > 0 else float("nan")


WINDOW_RULES = ("rsd", "contrast", "agreement", "pooled")


POPULATION_RULES = ("rsd", "contrast")  # statistics of the first round's scores (``window_statistic``)


def window_statistic(scores: np.ndarray, rule: str, k: int = 20) -> float:
    """The statistic a population rule maximises over window sides, on one population of poison scores.

    - ``rsd``: the paper's relative standard deviation, std / mean (nan where the mean is not positive).
    - ``contrast``: mean of the ``k`` highest scores minus the median score. A window that cuts whole
      triggers makes its top candidates flip many images while typical (clean) candidates flip few; a
      window too small cuts part of the trigger (the top falls), one too large pastes background that
      flips images by occlusion alone (the median rises). Unlike the RSD it does not grow without bound
      when almost every score is zero.

    The other rules, ``agreement`` (``destination_agreement``) and ``pooled`` (``pooled_agreement``), need
    the network, not only the scores: ``Scorer.agreement`` computes them."""
    scores = np.asarray(scores, dtype=np.float64)
    if rule == "rsd":
        return relative_std(scores)
    if rule == "contrast":
        if not len(scores):
            return float("nan")
        top = np.sort(scores)[::-1][: max(1, min(k, len(scores)))]
        return float(top.mean() - np.median(scores))
    raise ValueError(f"population window rule must be one of {', '.join(POPULATION_RULES)}, got {rule!r}")


def pick_window(stats: dict[int, float]) -> int:
    """The side with the largest statistic (ties: the smaller side; nan never wins unless every side is nan,
    then the smallest side)."""
    finite = {w: v for w, v in stats.items() if np.isfinite(v)}
    if not finite:
        return min(stats)
    best = max(finite.values())
    return min(w for w, v in finite.items() if v == best)


def choose_window(populations: dict[int, np.ndarray], rule: str, k: int = 20) -> tuple[int, dict[int, float]]:
    """The window side whose population of scores maximises ``window_statistic`` (``pick_window``), and
    every side's statistic."""
    stats = {w: window_statistic(populations[w], rule, k) for w in sorted(populations)}
    return pick_window(stats), stats


def destination_agreement(after: torch.Tensor, before: torch.Tensor) -> float:
    """How much ``C`` pasted patches agree on where they send the flip images: over ordered pairs of patches
    (a != b), the share of the flip images both moved (``after != before``) that both moved to the same
    cluster, 0 for a pair that moved no image in common; the mean over pairs. ``after`` is ``C x F`` (every
    patch pasted at the same ``F`` places, ``flip_destinations``), ``before`` is ``F``.

    The ``agreement`` window rule (``Scorer.agreement``) compares this for the top-``k`` candidates' located
    windows and for random windows of the same side cut from the same images: a trigger is one pattern cut
    from many images, so at the side that cuts it whole the top candidates are copies of it and send the
    flip images to the same cluster, while random windows of those images do not. A window so small or so
    large that it only occludes moves each flip image to its runner-up cluster whichever patch is pasted:
    located and random windows agree alike, and the difference cancels."""
    n = len(after)
    if n < 2:
        return float("nan")
    moved = after != before[None]
    both = (moved[:, None] & moved[None]).sum(-1).float()
    same = ((after[:, None] == after[None]) & moved[:, None] & moved[None]).sum(-1).float()
    off = ~torch.eye(n, dtype=torch.bool)
    return float((same[off] / both[off].clamp(min=1)).mean())


def pooled_agreement(after: torch.Tensor, before: torch.Tensor) -> float:
    """``destination_agreement`` pooled over the pairs: of all the flip images that two of the ``C`` patches
    both moved (counted once per ordered pair), the share both sent to the same cluster.

    Where ``destination_agreement`` averages the pairs' shares, so that a pair with one common move weighs
    as much as a pair with a hundred, this weighs each pair by its common moves. The ``pooled`` window rule
    takes, per side, the mean over ``search.window_draws`` draws (paste places and random windows seeded
    by ``search.seed + 1000 * draw``) of this for the located windows minus this for random windows."""
    if len(after) < 2:
        return float("nan")
    moved = after != before[None]
    both = moved[:, None] & moved[None]
    same = both & (after[:, None] == after[None])
    off = ~torch.eye(len(after), dtype=torch.bool)
    return float(same[off].sum() / both[off].sum().clamp(min=1))


def random_windows(image_ids, size: int, w: int, seed: int) -> torch.Tensor:
    """``C x 2`` top-left ``(x, y)`` corners of a ``w`` side window, uniform over each image, seeded by
    ``(seed, image id, w)``: the null the ``agreement`` rule holds the located windows against."""
    corners = [np.random.default_rng([seed, int(i), w, 1]).integers(0, size - w + 1, 2) for i in image_ids]
    return torch.as_tensor(np.array(corners, dtype=np.int64).reshape(-1, 2))


def shared_locations(n_cand: int, n_flip: int, size: int, w: int, seed: int) -> torch.Tensor:
    """``C x F x 2`` paste corners, the same ``F`` for every candidate (seeded by ``(seed, w)``), so that two
    patches are compared on the same pasted images."""
    rng = np.random.default_rng([seed, w, 2])
    one = torch.as_tensor(rng.integers(0, size - w + 1, (n_flip, 2)))
    return one[None].expand(n_cand, n_flip, 2).contiguous()


def top_k_accuracy(ranking: np.ndarray, poison_mask: np.ndarray, k: int = 20) -> float:
    """Share of poisons among the ``k`` top-ranked images (ground truth: for evaluation only)."""
    return float(poison_mask[ranking[:k]].mean())


def kth_place(scores: np.ndarray, scored: np.ndarray, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """The images ranked before the ``k``-th place whatever the tie order (``ahead``), and those ranked equal
    to the ``k``-th (``tied``: the same score, scored alike), as masks; scored images come first."""
    scores, scored = np.asarray(scores), np.asarray(scored, bool)
    kth = np.lexsort((~scored, -scores))[min(k, len(scores)) - 1]
    tied = (scores == scores[kth]) & (scored == scored[kth])
    ahead = (scores > scores[kth]) | ((scores == scores[kth]) & scored & ~scored[kth])
    return ahead, tied


def tie_fair_top_k_accuracy(scores: np.ndarray, scored: np.ndarray, poison_mask: np.ndarray, k: int = 20) -> float:
    """``top_k_accuracy`` with the ties at the ``k``-th place broken at random, in expectation: the images
    ranked equal to the ``k``-th (``kth_place``) fill the places left in proportion to the poisons among them.
    A ranking's own tie order (``SearchResult.ranking``: the ids of ``cluster.order``) cannot move it (ground
    truth: for evaluation only)."""
    poison_mask = np.asarray(poison_mask, bool)
    k = min(k, len(poison_mask))
    ahead, tied = kth_place(scores, scored, k)
    places = k - int(ahead.sum())
    return float((poison_mask[ahead].sum() + places * poison_mask[tied].mean()) / k)


SCORE_RULE = {"patchsearch": "into", "poisoncam": "changed"}  # each paper's poison score


def score_rule(params: Params) -> str:
    """The flip test's count: ``search.score_rule``, or where that is null PatchSearch's paper's for
    PatchSearch and ``search.poisoncam_score`` for PoisonCAM."""
    q = params.search
    return q.score_rule or (q.poisoncam_score if q.method == "poisoncam" else SCORE_RULE["patchsearch"])


def with_method(params: Params, method: str) -> Params:
    return dataclasses.replace(params, search=dataclasses.replace(params.search, method=method))


@dataclass
class DefenseContext:
    """What the search needs: the cluster classifier, the training pixels and the clustering."""

    params: Params
    model: ClusterClassifier
    normalise: Normaliser
    pixels: torch.Tensor  # N x 3 x H x W uint8 (CPU)
    images: ImageList
    assignment: np.ndarray
    flip_idx: np.ndarray
    outlier_stats: np.ndarray
    features: np.ndarray | None  # None where a shipped clustering leaves them out (notebook 03 extracts them)
    ids: np.ndarray  # N, the order the defense draws and breaks ties in (``defense_ids``)

    @property
    def size(self) -> int:
        return self.pixels.shape[-1]


def defense_context(params: Params, variant: str = "poisoned", progress: bool = True) -> DefenseContext:
    cluster_dir = cluster_stage(params, variant, progress)
    model_dir = train_stage(params, variant, progress=progress)
    pixels, images = training_set(params, variant, progress)
    z = np.load(cluster_dir / "clustering.npz")
    device = device_for_run()
    backbone = load_backbone(params, model_dir, pixels.shape[-1])
    model = ClusterClassifier(backbone, z["centroids"], params.search.cam_layer, params.compute.precision)
    model = model.to(device).eval()
    cfg = augment_config(params.ssl, pixels.shape[-1])
    return DefenseContext(
        params,
        model,
        Normaliser(cfg.mean, cfg.std, device),
        pixels,
        images,
        z["assignment"],
        z["flip_idx"],
        z["outlier_stats"],
        z["features"] if "features" in z.files else None,
        defense_ids(params, pixels),
    )


def heatmaps(
    ctx: DefenseContext, method: str, idx: np.ndarray, progress: bool = False, masks: torch.Tensor | None = None
) -> torch.Tensor:
    """Localization heatmaps ``len(idx) x H x W`` of training images ``idx`` (each for its own cluster);
    PoisonCAM uses ``masks`` when given, else the profile's (``search_masks``)."""
    q = ctx.params.search
    x = ctx.normalise(ctx.pixels[idx])
    targets = torch.as_tensor(ctx.assignment[idx])
    if method == "patchsearch":
        return grad_cam_batched(ctx.model, x, targets, max(1, q.batch_size // 4))
    masks = search_masks(ctx) if masks is None else masks
    return poisoncam_heatmaps(ctx.model, x, targets, masks, ctx.outlier_stats, q.batch_size, progress)


def search_masks(ctx: DefenseContext) -> torch.Tensor:
    q = ctx.params.search
    return make_masks(q.mask_strategy, q.masks, ctx.size, q.mask_grid, q.mask_keep, q.seed)


class Scorer:
    """Poison scores of training images for each window side, heatmaps computed once per image."""

    def __init__(self, ctx: DefenseContext, method: str, windows: list[int]) -> None:
        self.ctx, self.method, self.windows = ctx, method, windows
        n = len(ctx.pixels)
        self.corner = {w: np.full((n, 2), -1, dtype=np.int64) for w in windows}
        flip = torch.as_tensor(ctx.flip_idx)
        self.flip_pixels = ctx.pixels[flip].to(ctx.normalise.device)
        self.flip_before = torch.as_tensor(ctx.assignment[ctx.flip_idx])
        self.masks = search_masks(ctx) if method == "poisoncam" else None  # drawn once, used every round
        self.seconds = {"heatmaps": 0.0, "flip_test": 0.0}
        self.n_heatmaps = 0

    def locate(self, idx: np.ndarray) -> None:
        todo = idx[self.corner[self.windows[0]][idx, 0] < 0]
        if not len(todo):
            return
        start = time.perf_counter()
        maps = heatmaps(self.ctx, self.method, todo, masks=self.masks)
        for w in self.windows:
            xs, ys = best_windows(maps, w)
            self.corner[w][todo] = np.stack([xs.numpy(), ys.numpy()], 1)
        self.n_heatmaps += len(todo)
        self.seconds["heatmaps"] += time.perf_counter() - start

    def patches(self, idx: np.ndarray, w: int) -> torch.Tensor:
        self.locate(idx)
        c = torch.as_tensor(self.corner[w][idx])
        return cut_patches(self.ctx.pixels[torch.as_tensor(idx)], c[:, 0], c[:, 1], w)

    def score(self, idx: np.ndarray, w: int) -> np.ndarray:
        patches = self.patches(idx, w)
        start = time.perf_counter()
        q = self.ctx.params.search
        ids = self.ctx.ids[idx]
        locations = paste_locations(ids, len(self.flip_pixels), self.ctx.size, self.ctx.size, w, q.seed)
        scores = flip_test(
            self.ctx.model,
            self.ctx.normalise,
            self.flip_pixels,
            self.flip_before,
            patches.to(self.flip_pixels.device),
            torch.as_tensor(self.ctx.assignment[idx]),
            locations,
            q.batch_size,
            score_rule(self.ctx.params),
        )
        self.seconds["flip_test"] += time.perf_counter() - start
        return scores

    def agreement(self, idx: np.ndarray, w: int, draws: int = 1) -> dict[str, float]:
        """How much the located windows of images ``idx`` agree on where they send the flip images, against
        random windows of the same side cut from the same images, every patch pasted at the same places.

        ``agreement``: ``destination_agreement`` on draw 0 (seed ``search.seed``), located and random.
        ``pooled``: ``pooled_agreement``, located minus random, its mean and sd over ``draws`` draws of the
        paste places and random windows (draw ``d`` seeded by ``search.seed + 1000 * d``)."""
        start = time.perf_counter()
        q, size = self.ctx.params.search, self.ctx.size
        located = self.patches(idx, w)
        out, pooled = {}, []
        for draw in range(draws):
            seed = q.seed + 1000 * draw
            corners = random_windows(self.ctx.ids[idx], size, w, seed)
            chance = cut_patches(self.ctx.pixels[torch.as_tensor(idx)], corners[:, 0], corners[:, 1], w)
            places = shared_locations(len(idx), len(self.flip_pixels), size, w, seed)
            after = {
                name: flip_destinations(
                    self.ctx.model,
                    self.ctx.normalise,
                    self.flip_pixels,
                    patches.to(self.flip_pixels.device),
                    places,
                    q.batch_size,
                )
                for name, patches in (("located", located), ("random", chance))
            }
            if draw == 0:
                for name, moved in after.items():
                    out[f"agreement_{name}"] = destination_agreement(moved, self.flip_before)
            pooled.append(
                pooled_agreement(after["located"], self.flip_before)
                - pooled_agreement(after["random"], self.flip_before)
            )
        out["agreement"] = out["agreement_located"] - out["agreement_random"]
        out["pooled"] = float(np.mean(pooled))
        out["pooled_sd"] = float(np.std(pooled, ddof=1)) if draws > 1 else float("nan")
        self.seconds["flip_test"] += time.perf_counter() - start
        return out


class SweepCheckpoint:
    """The finished part of a search stage's sweep, in ``<stage key>.partial/`` beside the stage: each window
    side's search once it ends (``window_<w>.npz``), the windows located so far (``located.npz``, written
    after the side's file) and each side's agreement (``agreement.json``). A search stopped part way (a GPU
    job at its deadline: ``helpers.runners.gpu`` carries the folder to the next try) resumes after its last
    finished side with the scorer's state of that moment, so it ends with the result of an uninterrupted run.
    """

    def __init__(self, work: Path, scorer: Scorer, ids: np.ndarray | None) -> None:
        self.work, self.scorer, self.ids = Path(work), scorer, ids
        self.done: list[int] = []
        self.agreements: dict[str, dict] = {}
        if (self.work / "located.npz").is_file():
            z = np.load(self.work / "located.npz")
            self.done = [int(w) for w in z["done"]]
            for w in scorer.windows:
                scorer.corner[w][z["located"]] = z[f"corner_w{w}"]
            scorer.n_heatmaps = int(z["n_heatmaps"])
        if (self.work / "agreement.json").is_file():
            self.agreements = json.loads((self.work / "agreement.json").read_text())

    def result(self, w: int) -> SearchResult | None:
        """Side ``w``'s finished search, or None where it has not ended yet."""
        if w not in self.done:
            return None
        z = np.load(self.work / f"window_{w}.npz")
        return SearchResult(z["scores"], z["scored"], json.loads(str(z["rounds"])), z["round_of"], self.ids)

    def save(self, w: int, result: SearchResult) -> None:
        rounds = np.array(json.dumps(result.rounds))
        io.save_npz(
            self.work / f"window_{w}.npz",
            scores=result.scores,
            scored=result.scored,
            round_of=result.round_of,
            rounds=rounds,
        )
        self.done.append(w)
        corner = self.scorer.corner
        located = np.flatnonzero(corner[self.scorer.windows[0]][:, 0] >= 0)
        io.save_npz(
            self.work / "located.npz",
            done=np.array(self.done),
            located=located,
            n_heatmaps=np.array(self.scorer.n_heatmaps),
            **{f"corner_w{v}": corner[v][located] for v in self.scorer.windows},
        )

    def agreement(self, idx: np.ndarray, w: int, draws: int) -> dict[str, float]:
        """``Scorer.agreement`` of side ``w``, computed once and kept."""
        if str(w) not in self.agreements:
            self.agreements[str(w)] = self.scorer.agreement(idx, w, draws)
            io.write_json(self.work / "agreement.json", self.agreements)
        return self.agreements[str(w)]


def search_stage(params: Params, variant: str = "poisoned", progress: bool = True) -> Path:
    """Iterative search for every window side of ``search.window_sweep`` (and ``search.window_px``); the side
    used is ``search.window_px``, or where that is null the blind pick of ``search.window_rule``: ``rsd`` and
    ``contrast`` over the first round's scores, the same images for every side
    (``helpers.search.choose_window``); ``agreement`` and ``pooled`` over each side's top candidates
    (``search.window_top_k``) against random windows of the same images
    (``helpers.search.destination_agreement``, ``helpers.search.pooled_agreement``). Every rule's
    statistic and pick is saved (``sweep.csv``) with the ranking, candidate boxes and top patches of the
    side used, and every side's scores. A search stopped part way resumes after its last finished side
    (``SweepCheckpoint``)."""
    check_variant(variant)
    q = params.search

    def compute(out: Path, final: Path, work: Path) -> None:
        start = time.perf_counter()
        ctx = defense_context(params, variant, progress)
        windows = sorted(set(q.window_sweep) | ({q.window_px} if q.window_px else set()))
        windows = [w for w in windows if w <= ctx.size]
        scorer = Scorer(ctx, q.method, windows)
        checkpoint = SweepCheckpoint(work, scorer, ctx.ids)
        results: dict[int, SearchResult] = {}
        sweep, rounds = [], []
        for w in tqdm(windows, desc=f"search ({q.method})", disable=not progress):
            result = checkpoint.result(w)
            if result is None:
                result = iterative_search(
                    ctx.assignment,
                    lambda idx, w=w: scorer.score(idx, w),
                    q.samples_per_cluster,
                    q.prune_fraction,
                    q.seed,
                    ids=ctx.ids,
                )
                checkpoint.save(w, result)
            results[w] = result
            rounds += [{"window": w, **r} for r in result.rounds]
            sweep.append(
                {
                    "window": w,
                    "scored": int(result.scored.sum()),
                    "max_score": float(result.scores.max()),
                    "rounds": len(result.rounds),
                }
            )
        first = {w: np.flatnonzero(r.round_of == 0) for w, r in results.items()}
        if any(not np.array_equal(first[w], first[windows[0]]) for w in windows):
            raise RuntimeError("the first search round scored different images for different window sides")
        population = {w: results[w].scores[first[w]] for w in windows}
        table = pd.DataFrame(sweep)
        picks = {}
        for rule in POPULATION_RULES:
            picks[rule], stats = choose_window(population, rule, q.window_top_k)
            table[rule] = table["window"].map(stats)
            table[f"{rule}_pick"] = table["window"] == picks[rule]
        agree = pd.DataFrame(
            [checkpoint.agreement(results[w].ranking()[: q.window_top_k], w, q.window_draws) for w in windows]
        )
        for column in agree.columns:
            table[column] = agree[column].to_numpy()
        for rule in ("agreement", "pooled"):
            picks[rule] = pick_window(dict(zip(windows, agree[rule], strict=True)))
            table[f"{rule}_pick"] = table["window"] == picks[rule]
        w = picks[q.window_rule] if q.window_px is None else q.window_px
        table["used"] = table["window"] == w
        chosen = results[w]
        ranking = chosen.ranking()
        io.save_npz(
            out / "search.npz",
            scores=chosen.scores,
            scored=chosen.scored,
            ranking=ranking,
            corners=scorer.corner[w],
            window=np.array(w),
            **{f"scores_w{v}": results[v].scores for v in windows},
            **{f"scored_w{v}": results[v].scored for v in windows},
            first_round=first[windows[0]],
        )
        io.write_text(out / "sweep.csv", table.to_csv(index=False))
        io.write_text(out / "rounds.csv", pd.DataFrame(rounds).to_csv(index=False))
        top = ranking[: q.save_top]
        patches = scorer.patches(top, w)
        (out / "top_patches").mkdir()
        for rank, (i, patch) in enumerate(zip(top, patches, strict=True)):
            Image.fromarray(patch.permute(1, 2, 0).numpy()).save(out / "top_patches" / f"{rank:04d}_{i}.png")
        summary = {
            "method": q.method,
            "score_rule": score_rule(params),
            "window": w,
            "window_rule": None if q.window_px else q.window_rule,
            "scored": int(chosen.scored.sum()),
            "heatmaps": scorer.n_heatmaps,
            "seconds": time.perf_counter() - start,
            **{f"seconds_{k}": v for k, v in scorer.seconds.items()},
        }
        io.write_json(out / "summary.json", summary)

    return resumable_stage(f"search_{variant}", params, compute).path


def load_search(path: Path) -> dict:
    z = np.load(path / "search.npz")
    out = {k: z[k] for k in z.files}
    out["window"] = int(out["window"])
    out["sweep"] = pd.read_csv(path / "sweep.csv")
    out["rounds"] = pd.read_csv(path / "rounds.csv")
    out["summary"] = json.loads((path / "summary.json").read_text())
    return out
