"""The defenses as cached stages: clustering -> search (PatchSearch or PoisonCAM) -> poison classifier
-> filtered training list, then SSL retrained on the filtered list.

``variant='poisoned'`` defends the poisoned training set with the model trained on it; ``'clean'`` runs
the same defense on the clean set with the clean model (a defender does not know whether there is an
attack: paper Table 10). ``search.method`` picks the localization (``patchsearch`` = Grad-CAM,
``poisoncam`` = cluster activation masking); everything after it is shared, as in the PoisonCAM paper.
The ground truth (which images are poisoned) is never read here; the notebooks use it to evaluate.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import io
from .attack import poisoned_train_pixels, run_attack
from .cache import cached_stage
from .cam import (
    ClusterClassifier,
    Normaliser,
    best_windows,
    cluster_outlier_stats,
    cut_patches,
    grad_cam_batched,
    localization_baselines,
    make_masks,
    poisoncam_heatmaps,
    window_hits_any,
)
from .cluster import content_ids, kmeans, l2_normalise
from .compute import device_for_run
from .data import ImageList, load_data, write_file_list
from .models import extract_features
from .params import Params
from .poison_classifier import (
    predict_logits,
    proxy_validation,
    train_classifier,
    training_pool,
)
from .search import (
    POPULATION_RULES,
    SearchResult,
    choose_window,
    destination_agreement,
    flip_destinations,
    flip_set,
    flip_test,
    iterative_search,
    paste_locations,
    pick_window,
    pooled_agreement,
    random_windows,
    shared_locations,
    top_k_accuracy,
)
from .train import augment_config, load_backbone, train_stage

VARIANTS = ("poisoned", "clean")
SCORE_RULE = {"patchsearch": "into", "poisoncam": "changed"}  # each paper's poison score


def score_rule(params: Params) -> str:
    """The flip test's count: ``search.score_rule``, or where that is null PatchSearch's paper's for
    PatchSearch and ``search.poisoncam_score`` for PoisonCAM."""
    q = params.search
    return q.score_rule or (q.poisoncam_score if q.method == "poisoncam" else SCORE_RULE["patchsearch"])


def with_method(params: Params, method: str) -> Params:
    return dataclasses.replace(params, search=dataclasses.replace(params.search, method=method))


def _check(variant: str) -> None:
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
    _check(variant)
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


def search_stage(params: Params, variant: str = "poisoned", progress: bool = True) -> Path:
    """Iterative search for every window side of ``search.window_sweep`` (and ``search.window_px``); the side
    used is ``search.window_px``, or where that is null the blind pick of ``search.window_rule``: ``rsd`` and
    ``contrast`` over the first round's scores, the same images for every side
    (``helpers.search.choose_window``); ``agreement`` and ``pooled`` over each side's top candidates
    (``search.window_top_k``) against random windows of the same images
    (``helpers.search.destination_agreement``, ``helpers.search.pooled_agreement``). Every rule's
    statistic and pick is saved (``sweep.csv``) with the ranking, candidate boxes and top patches of the
    side used, and every side's scores."""
    _check(variant)
    q = params.search

    def compute(out: Path, final: Path) -> None:
        start = time.perf_counter()
        ctx = defense_context(params, variant, progress)
        windows = sorted(set(q.window_sweep) | ({q.window_px} if q.window_px else set()))
        windows = [w for w in windows if w <= ctx.size]
        scorer = Scorer(ctx, q.method, windows)
        results: dict[int, SearchResult] = {}
        sweep, rounds = [], []
        for w in tqdm(windows, desc=f"search ({q.method})", disable=not progress):
            result = iterative_search(
                ctx.assignment,
                lambda idx, w=w: scorer.score(idx, w),
                q.samples_per_cluster,
                q.prune_fraction,
                q.seed,
                ids=ctx.ids,
            )
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
            [scorer.agreement(results[w].ranking()[: q.window_top_k], w, q.window_draws) for w in windows]
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

    return cached_stage(f"search_{variant}", params, compute).path


def load_search(path: Path) -> dict:
    z = np.load(path / "search.npz")
    out = {k: z[k] for k in z.files}
    out["window"] = int(out["window"])
    out["sweep"] = pd.read_csv(path / "sweep.csv")
    out["rounds"] = pd.read_csv(path / "rounds.csv")
    out["summary"] = json.loads((path / "summary.json").read_text())
    return out


def classifier_stage(params: Params, variant: str = "poisoned", progress: bool = True) -> Path:
    """The poison classifier ensemble over the search's top-k patches; writes the filtered and the removed
    training lists (``filtered.txt``, ``removed.txt``) and every image's scores (``scores.csv``)."""
    _check(variant)
    c = params.classifier
    search_dir = search_stage(params, variant, progress)

    def compute(out: Path, final: Path) -> None:
        start = time.perf_counter()
        found = load_search(search_dir)
        pixels, images = training_set(params, variant, progress)
        w, ranking = found["window"], found["ranking"]
        top = ranking[: c.top_k]
        corners = torch.as_tensor(found["corners"][top])
        patches = cut_patches(pixels[torch.as_tensor(top)], corners[:, 0], corners[:, 1], w)
        val_idx, val_labels = proxy_validation(ranking[found["scored"][ranking]], c.top_k)  # among scored images
        pool = training_pool(ranking, c.exclude_top, val_idx, defense_ids(params, pixels))
        cfg_ssl = augment_config(params.ssl, pixels.shape[-1])
        normalise = Normaliser(cfg_ssl.mean, cfg_ssl.std, device_for_run())
        logits, histories = [], []
        for m in range(c.n_models):
            model, history = train_classifier(
                pixels,
                pool,
                patches,
                w,
                val_idx,
                val_labels,
                c,
                cfg_ssl.mean,
                cfg_ssl.std,
                c.seed + m,
                normalise,
                progress,
                params.compute.precision,
            )
            histories += [{"model": m, **h} for h in history]
            logits.append(predict_logits(model, normalise, pixels, precision=params.compute.precision).numpy())
        logits = np.stack(logits)
        mean_logits = logits.mean(0)
        removed = mean_logits.argmax(1) == 1
        io.save_npz(out / "classifier.npz", logits=logits, removed=removed)
        write_file_list(out / "filtered.txt", images.subset(np.flatnonzero(~removed)))
        write_file_list(out / "removed.txt", images.subset(np.flatnonzero(removed)))
        table = pd.DataFrame(
            {
                "index": np.arange(len(pixels)),
                "path": images.paths,
                "poison_score": found["scores"],
                "scored": found["scored"],
                "classifier_logit": mean_logits[:, 1] - mean_logits[:, 0],
                "removed": removed,
            }
        )
        io.write_text(out / "scores.csv", table.to_csv(index=False))
        io.write_text(out / "history.csv", pd.DataFrame(histories).to_csv(index=False))
        io.write_json(
            out / "summary.json",
            {
                "removed": int(removed.sum()),
                "n": len(removed),
                "pool": len(pool),
                "seconds": time.perf_counter() - start,
            },
        )

    return cached_stage(f"classifier_{variant}", params, compute).path


def filtered_model_stage(params: Params, icutmix: bool | None = None, progress: bool = True) -> Path:
    """The cached ``ssl_filtered`` stage: the SSL model retrained on the poisoned set minus what the defense
    of ``params.search.method`` removed (with ``icutmix``: the paper's "PatchSearch + i-CutMix")."""
    return train_stage(params, "filtered", icutmix, progress, keep=lambda: kept_indices(params, progress))


def kept_indices(params: Params, progress: bool = False) -> np.ndarray:
    """Indices of the poisoned training set the defense of ``params.search.method`` keeps. The defense
    always inspects the model trained without i-CutMix (``ssl.icutmix`` only changes how the final model
    is retrained on the filtered set: the paper's "PatchSearch + i-CutMix")."""
    params = dataclasses.replace(params, ssl=dataclasses.replace(params.ssl, icutmix=False))
    z = np.load(classifier_stage(params, "poisoned", progress) / "classifier.npz")
    return np.flatnonzero(~z["removed"])


def detection_metrics(
    found: dict, removed: np.ndarray, poison: np.ndarray, boxes: np.ndarray, image_size: int, k: int = 20
) -> dict:
    """A row of the paper's Table 1 (ground truth: for evaluation only): top-k accuracy of the search's
    ranking, recall, precision and total of the classifier's removals, and how often the candidate window
    of a scored poisoned image hits its trigger, beside how often a window of the same side at the image
    centre, or at a random place, would (``cam.localization_baselines``). ``boxes``: ``N x >=3`` or
    ``N x copies x >=3`` (an image with several triggers is hit when any of them is): the true boxes of the
    scored poisons (``np.flatnonzero(found["scored"] & poison)``, in that order)."""
    scored_poisons = np.flatnonzero(found["scored"] & poison)
    corners = found["corners"][scored_poisons]
    w = found["window"]
    hits = window_hits_any(corners[:, 0], corners[:, 1], w, boxes)
    baselines = localization_baselines(boxes, w, image_size)
    return {
        "poisons": int(poison.sum()),
        "w": found["window"],
        f"top-{k} acc (%)": 100 * top_k_accuracy(found["ranking"], poison, k),
        "recall (%)": 100 * (removed & poison).sum() / poison.sum(),
        "precision (%)": 100 * (removed & poison).sum() / max(removed.sum(), 1),
        "total removed": int(removed.sum()),
        "clean removed (%)": 100 * (removed & ~poison).sum() / max((~poison).sum(), 1),
        "trigger hit, scored poisons (%)": 100 * hits.mean() if len(hits) else float("nan"),
        **{f"{name} window hit (%)": 100 * rate for name, rate in baselines.items()},
    }
