"""The one params schema, its validation, and the per-stage hash used by the cache.

A profile (``params/<name>.yaml``) sets any subset of the fields below; missing fields take the
defaults written here. An unknown key, a wrong type or an out-of-range value is an error that names
the file and the key (``ParamsError``).

Later pipeline stages add their own sections here; ``STAGE_INPUTS`` (from ``helpers.stages``) says which
sections each cached stage reads, so changing a parameter recomputes exactly the stages that read it (and
those after them).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import paths, stages
from .paths import DataError


class ParamsError(ValueError):
    """A params file that does not fit the schema."""


@dataclass(frozen=True)
class DataParams:
    dataset: str = "cifar10"  # names the default data root and the how-to-get-it message
    root: str | None = None  # data root; None = $PATCHSEARCH_DATA_ROOT, then the dataset's default
    train_split: str = "train"  # ImageFolder sub-folder of the (unlabelled) training set
    val_split: str = "test"  # sub-folder of the validation set (CIFAR-10 calls it test)
    image_size: int | None = None  # None = native size (must be uniform to cache); else resize+crop
    train_per_class: int | None = None  # None = all images; else a seeded subset per class
    val_per_class: int | None = None
    seed: int = 0  # draws the subsets


@dataclass(frozen=True)
class AttackParams:
    target_class: str = "bird"  # folder name of the attacker's target category
    poison_rate: float = 0.5  # fraction of the target category that gets the trigger (paper: 50%)
    trigger: str = "random"  # "random" (HTBA-style colour grid) or a path to a PNG file
    trigger_seed: int = 10  # seeds the random colour grid
    trigger_grid: int = 4  # HTBA triggers: a grid x grid random colour image, upsampled bilinearly
    trigger_size: float = 50 / 224  # trigger side as a fraction of the image's shorter side (paper: 50 px at 224)
    trigger_px: int | None = None  # if set, the trigger side in pixels on every image (the paper's 50 px)
    n_copies: int = 1  # triggers pasted per poisoned image (paper Table 9 "repeated patches": 5)
    train_margin: float = 0.25  # training poisons: top-left uniform in [m W, (1 - m) W - w]
    val_margin: float = 0.10  # patched validation set: the same with this margin
    seed: int = 0  # draws the poisoned images and the trigger locations


@dataclass(frozen=True)
class SSLParams:
    method: str = "mocov2"  # mocov2 | byol | simclr | mocov3
    arch: str = "resnet18"  # resnet18 | resnet10 | vit
    width: int = 64  # ResNet first-stage channels (64 = the standard ResNet-18)
    stem: str = "cifar"  # cifar (3x3 conv, no max-pool) | imagenet (7x7 stride 2 + max-pool)
    stem_stride: int = 1  # stride of the CIFAR stem's conv (2 halves every feature map: cheaper, coarser)
    vit_patch: int = 4
    vit_dim: int = 192
    vit_depth: int = 12
    vit_heads: int = 3
    epochs: int = 200
    batch_size: int = 256  # per process
    optimizer: str = "sgd"  # sgd (momentum 0.9) | adamw
    lr: float = 0.06  # per 256 images (linear scaling), cosine schedule after warm-up
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    proj_dim: int = 128
    proj_hidden: int = 512
    temperature: float = 0.2
    queue_size: int = 4096  # MoCo-v2 negatives
    momentum: float = 0.99  # momentum encoder (BYOL and MoCo-v3: its start value, cosine to 1)
    symmetric: bool = True  # MoCo-v2: also the loss with the views swapped
    crop_min_scale: float = 0.2  # random resized crop scale range [crop_min_scale, 1]
    blur_p: float = 0.0  # Gaussian blur probability (MoCo-v2 at 224 px: 0.5)
    icutmix: bool = False  # i-CutMix (the notebooks also train it on purpose as a baseline)
    seed: int = 0


@dataclass(frozen=True)
class EvalParams:
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1])  # labelled share for the probe
    probe_seeds: int = 5  # label subsets (and probe initialisations) per fraction: mean and std
    probe_epochs: int = 200  # full-batch Adam steps of the linear probe on frozen features
    probe_lr: float = 0.01  # lr and weight decay chosen on training images held out of the 10% labels
    probe_weight_decay: float = 0.01  # (never on validation data): less decay overfits 1,000 labels
    knn_k: int = 20
    knn_temperature: float = 0.07
    batch_size: int = 512  # feature extraction
    seed: int = 0


@dataclass(frozen=True)
class ClusterParams:
    k: int = 1000  # k-means clusters (paper: 1000 for 127k images, about 127 per cluster)
    iterations: int = 20
    batch_size: int = 512  # feature extraction
    seed: int = 0
    # The order in which the defense (clustering, search, classifier) visits the training images wherever it
    # draws at random or breaks a tie: ``content`` = by a seeded hash of each image's pixels
    # (``cluster.content_ids``), so nothing depends on the order of the classes or the files; ``file`` = by
    # index in the file list, which is class-sorted (ties then favour the first classes: issue 22).
    order: str = "content"


# helpers.search counts them (its SCORE_RULES)
SCORE_RULES = ("into", "changed", "into_vs_flat", "changed_vs_flat", "toward_vs_flat")


@dataclass(frozen=True)
class SearchParams:
    method: str = "patchsearch"  # patchsearch (Grad-CAM) | poisoncam (cluster activation masking)
    window_px: int | None = None  # candidate trigger side w; null: chosen from the data by window_rule
    window_sweep: list[int] = field(default_factory=lambda: [20, 30, 40, 50, 60, 80, 100])  # w tried blind
    window_rule: str = "rsd"  # blind choice of w: rsd (the paper) | contrast | agreement | pooled (helpers.search)
    window_top_k: int = 20  # top candidates the blind rules read: contrast's top mean, agreement's pairs
    window_draws: int = 8  # pooled rule: draws of paste places and random windows averaged
    cam_layer: str = "layer4"  # PatchSearch's Grad-CAM layer of a ResNet (paper: layer4, 7x7 at 224 px)
    samples_per_cluster: int = 2  # s: images scored per surviving cluster and round
    prune_fraction: float = 0.25  # r: share of the surviving clusters pruned per round
    masks: int = 256  # PoisonCAM: B masks per image
    mask_strategy: str = "full"  # full (coverage) | random | interval
    mask_grid: int = 7  # PoisonCAM: masks are grid x grid cells upsampled to the image
    mask_keep: float = 0.5  # PoisonCAM: share of the cells each mask keeps
    score_rule: str | None = None  # the flip test's count for both methods (helpers.search.SCORE_RULES); null:
    # PatchSearch's paper's (into) for PatchSearch, poisoncam_score for PoisonCAM
    poisoncam_score: str = "changed"  # PoisonCAM's count where score_rule is null: changed (its paper's), into,
    # into_vs_flat or changed_vs_flat (the same counts less what a flat square of the candidate's colour does)
    save_top: int = 100  # top-ranked candidate patches saved as PNG
    batch_size: int = 1024  # images per forward pass (flip test, masks, Grad-CAM)
    seed: int = 0


@dataclass(frozen=True)
class ClassifierParams:
    top_k: int = 20  # top-ranked patches the classifier learns, and the size of each proxy-validation half
    exclude_top: float = 0.1  # share of the top-scored images left out of the training pool
    n_models: int = 5  # ensemble (averaged logits)
    width: int = 16  # first-stage channels of the ResNet-10-like classifier
    stem_stride: int = 1
    batch_size: int = 32
    max_iters: int = 2000
    eval_every: int = 20
    patience: int = 10  # evaluations with int(100 * F1) unchanged before stopping
    lr: float = 0.01
    weight_decay: float = 0.0001
    paste_p: float = 0.5
    paste_scale: list[float] = field(default_factory=lambda: [1 / 3, 4 / 3])  # pasted side / w (paper: 20-80 px, w 60)
    negative_paste: float = 0.0  # share of label-0 samples given a natural patch pasted the same way (paper: 0)
    exclude_top_clusters: bool = False  # also leave out of the pool every image of the top-k's clusters (paper: no)
    crop_min_scale: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class ComputeParams:
    """How the networks run (``helpers.compute``). Only ``precision`` can change a result, so only it enters
    the cache keys; threads and compilation change the speed alone."""

    precision: str = "auto"  # auto | fp32 | bf16 (autocast); auto = bf16 where the device has it natively
    # SSL pre-training (and the retraining on a filtered list): fp32 by default. On the cifar10 profile bf16
    # planted a weaker backdoor on one training seed of two (figures/cifar10/02_precision_*.md)
    ssl_precision: str = "fp32"
    compile: bool = False  # torch.compile the SSL training step (see make bench for whether it pays)
    threads: int | None = None  # torch threads of a stage run alone; None = torch's default


@dataclass(frozen=True)
class KDParams:
    """Trusted-data knowledge distillation (Saha et al. 2022's defense, PatchSearch Table 3; ``helpers.kd``)."""

    trusted: float = 0.25  # share of the clean training set the defender trusts (the paper: 25%, 10%, 5%)
    epochs: int = 130  # passes over the trusted images (SSL-Backdoor's CompRess runs: 130)
    batch_size: int = 64  # the trusted sets are small: 5% of 10,000 images is 7 steps of 64 an epoch
    queue_size: int = 512  # teacher embeddings the similarity distributions are taken over
    temperature: float = 0.04  # of both distributions (CompRess)
    seed: int = 0


@dataclass(frozen=True)
class FinetuneParams:
    """Finetuning the whole backbone on the downstream labels (PatchSearch Table 4; ``helpers.finetune``)."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 0.01  # SGD with momentum 0.9 and a cosine schedule, backbone and head alike
    weight_decay: float = 0.0005
    seeds: int = 3  # label subsets (the probe's first ones) per label fraction
    seed: int = 0


@dataclass(frozen=True)
class MixParams:
    """What i-CutMix pastes and how it weighs the loss (PatchSearch Table 8; ``helpers.mixing``)."""

    fill: str = "crop"  # crop (another image's box: i-CutMix) | black (CutOut) | noise (RandomErase)
    loss: str = "weighted"  # weighted (lambda own + (1 - lambda) partner) | onehot (own key only)


@dataclass(frozen=True)
class FigureParams:
    n_examples: int = 16  # images per example grid
    localization_sample: int = 200  # poisoned (and as many clean) images whose heatmaps notebook 04 evaluates
    dpi: int = 150


@dataclass(frozen=True)
class Params:
    profile: str
    description: str = ""
    data: DataParams = field(default_factory=DataParams)
    attack: AttackParams = field(default_factory=AttackParams)
    ssl: SSLParams = field(default_factory=SSLParams)
    eval: EvalParams = field(default_factory=EvalParams)
    cluster: ClusterParams = field(default_factory=ClusterParams)
    search: SearchParams = field(default_factory=SearchParams)
    classifier: ClassifierParams = field(default_factory=ClassifierParams)
    compute: ComputeParams = field(default_factory=ComputeParams)
    figures: FigureParams = field(default_factory=FigureParams)
    kd: KDParams = field(default_factory=KDParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    mix: MixParams = field(default_factory=MixParams)
    # Named sets of overrides for the rows that change the victim's or the defense's settings beyond the
    # profile's own (e.g. ``byol: {ssl: {method: byol}}`` for the BYOL rows of Table 2): ``with_variant``.
    # No stage reads this section: a variant's stages are keyed by the params it produces.
    variants: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Sections each cached stage reads, upstream ones included: the stage's cache key hashes exactly these
# (declared in ``helpers.stages``, with the stage's upstream stages and its code).
STAGE_INPUTS: dict[str, tuple[str, ...]] = {s.name: stages.sections(s.name) for s in stages.STAGES}


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:  # an int is a fine float; a bool is not a number here
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    return "null" if annotation is type(None) else annotation.__name__


# YAML 1.1 (PyYAML) reads 1e-3 as a string: it wants 1.0e-3. A float key takes both.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def _takes_float(annotation: Any) -> bool:
    args = typing.get_args(annotation)
    return annotation is float or float in args or (typing.get_origin(annotation) is list and args == (float,))


def _yaml_float(value: Any) -> Any:
    if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_yaml_float(v) for v in value]
    return value


def _build(cls: type, raw: Any, where: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: '{where or 'top level'}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            name = f"{where}.{key}" if where else str(key)
            raise ParamsError(f"{source}: unknown key '{name}' (known keys here: {', '.join(sorted(known))})")
    values = {}
    for f in dataclasses.fields(cls):
        name = f"{where}.{f.name}" if where else f.name
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ParamsError(f"{source}: missing required key '{name}'")
            continue
        value, annotation = raw[f.name], hints[f.name]
        value = _yaml_float(value) if _takes_float(annotation) else value
        if dataclasses.is_dataclass(annotation):
            values[f.name] = _build(annotation, value, name, source)
        elif not _type_ok(value, annotation):
            raise ParamsError(
                f"{source}: key '{name}' must be {_type_name(annotation)}, got {value!r} ({type(value).__name__})"
            )
        else:
            values[f.name] = float(value) if annotation is float else value
            if typing.get_origin(annotation) is list and typing.get_args(annotation)[0] is float:
                values[f.name] = [float(v) for v in value]
    return cls(**values)


# The range of every numeric key, as an interval ("[1, inf)": at least 1; "(0, 1]": above 0, at most 1), with
# why where it is not plain; a list's range holds for each of its items; null passes where the key allows it.
# ``tests/test_params.py`` walks the schema and fails on a numeric key missing here.
POSITIVE, COUNT, SEED, SHARE = "(0, inf)", "[1, inf)", "[0, inf)", "(0, 1]"
# Under 8 first-stage channels (one AVX2 register of fp32), oneDNN's channels-last 1x1 convolution backward
# corrupted memory on an AVX2 CPU (torch 2.14.1, 2026-12-08: a segfault, a double free, or a hang)
NARROW = "fewer channels crash oneDNN's convolutions on an AVX2 CPU"
RANGES: dict[str, str | tuple[str, str]] = {
    "data.image_size": COUNT,
    "data.train_per_class": COUNT,
    "data.val_per_class": COUNT,
    "data.seed": SEED,
    "attack.poison_rate": (SHARE, "a fraction of the target category"),
    "attack.trigger_seed": SEED,
    "attack.trigger_grid": COUNT,
    "attack.trigger_size": ("(0, 1)", "a fraction of the image side"),
    "attack.trigger_px": COUNT,
    "attack.n_copies": COUNT,
    "attack.train_margin": ("[0, 0.5)", "a fraction of the image side on each border"),
    "attack.val_margin": ("[0, 0.5)", "a fraction of the image side on each border"),
    "attack.seed": SEED,
    "ssl.width": ("[8, inf)", NARROW),
    "ssl.stem_stride": COUNT,
    "ssl.vit_patch": COUNT,
    "ssl.vit_dim": COUNT,
    "ssl.vit_depth": COUNT,
    "ssl.vit_heads": COUNT,
    "ssl.epochs": COUNT,
    "ssl.batch_size": COUNT,
    "ssl.lr": (POSITIVE, "a learning rate"),
    "ssl.weight_decay": "[0, inf)",
    "ssl.warmup_epochs": "[0, inf)",
    "ssl.proj_dim": COUNT,
    "ssl.proj_hidden": COUNT,
    "ssl.temperature": (POSITIVE, "the contrastive loss divides by it"),
    "ssl.queue_size": COUNT,
    "ssl.momentum": ("[0, 1)", "the momentum encoder's EMA rate"),
    "ssl.crop_min_scale": (SHARE, "a share of the image area"),
    "ssl.blur_p": ("[0, 1]", "a probability"),
    "ssl.seed": SEED,
    "eval.label_fractions": (SHARE, "fractions of the labels"),
    "eval.probe_seeds": COUNT,
    "eval.probe_epochs": COUNT,
    "eval.probe_lr": POSITIVE,
    "eval.probe_weight_decay": "[0, inf)",
    "eval.knn_k": COUNT,
    "eval.knn_temperature": POSITIVE,
    "eval.batch_size": COUNT,
    "eval.seed": SEED,
    "cluster.k": COUNT,
    "cluster.iterations": COUNT,
    "cluster.batch_size": COUNT,
    "cluster.seed": SEED,
    "search.window_px": COUNT,
    "search.window_sweep": (COUNT, "window sides in pixels"),
    "search.window_top_k": ("[2, inf)", "the agreement rule compares pairs"),
    "search.window_draws": COUNT,
    "search.samples_per_cluster": COUNT,
    "search.prune_fraction": ("(0, 1]", "a share of the surviving clusters"),
    "search.masks": COUNT,
    "search.mask_grid": COUNT,
    "search.mask_keep": ("(0, 1)", "a share of the mask's cells"),
    "search.save_top": "[0, inf)",
    "search.batch_size": COUNT,
    "search.seed": SEED,
    "classifier.top_k": COUNT,
    "classifier.exclude_top": ("[0, 1)", "a share of the ranking"),
    "classifier.n_models": COUNT,
    "classifier.width": ("[8, inf)", NARROW),
    "classifier.stem_stride": COUNT,
    "classifier.batch_size": COUNT,
    "classifier.max_iters": COUNT,
    "classifier.eval_every": COUNT,
    "classifier.patience": COUNT,
    "classifier.lr": POSITIVE,
    "classifier.weight_decay": "[0, inf)",
    "classifier.paste_p": ("[0, 1)", "a probability"),
    "classifier.paste_scale": (POSITIVE, "pasted sides relative to w"),
    "classifier.negative_paste": ("[0, 1]", "a probability"),
    "classifier.crop_min_scale": SHARE,
    "classifier.seed": SEED,
    "compute.threads": COUNT,
    "figures.n_examples": COUNT,
    "figures.localization_sample": COUNT,
    "figures.dpi": COUNT,
    "kd.trusted": (SHARE, "a share of the training set"),
    "kd.epochs": COUNT,
    "kd.batch_size": COUNT,
    "kd.queue_size": COUNT,
    "kd.temperature": POSITIVE,
    "kd.seed": SEED,
    "finetune.epochs": COUNT,
    "finetune.batch_size": COUNT,
    "finetune.lr": POSITIVE,
    "finetune.weight_decay": "[0, inf)",
    "finetune.seeds": COUNT,
    "finetune.seed": SEED,
}


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def in_interval(value: float, interval: str) -> bool:
    """Whether ``value`` lies in ``interval``, written as in ``RANGES`` (e.g. ``"(0, 1]"``); NaN never does."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = value > lo if interval[0] == "(" else value >= lo
    below = value < hi if interval[-1] == ")" else value <= hi
    return above and below


def _check_ranges(p: Params, source: str) -> None:
    def bad(key: str, value: Any, rule: str) -> ParamsError:
        return ParamsError(f"{source}: key '{key}' = {value!r} is out of range: {rule}")

    if not _PLAIN_NAME.fullmatch(p.profile) or ".." in p.profile:  # it names folders: figures/<profile>/
        raise bad("profile", p.profile, "must be a plain name: letters, digits, '.', '_' and '-', no path")
    full = p.to_dict()
    for key, rule in RANGES.items():
        interval, why = rule if isinstance(rule, tuple) else (rule, "")
        section, name = key.split(".")
        value = full[section][name]
        items = value if isinstance(value, list) else [value]
        if value is not None and not all(in_interval(v, interval) for v in items):
            each = "each item " if isinstance(value, list) else ""
            raise bad(key, value, f"{each}must be in {interval}" + (f" ({why})" if why else ""))
    a, s, e = p.attack, p.ssl, p.eval
    choices = {
        "method": ("mocov2", "byol", "simclr", "mocov3"),
        "arch": ("resnet18", "resnet10", "vit"),
        "stem": ("cifar", "imagenet"),
        "optimizer": ("sgd", "adamw"),
    }
    for key, allowed in choices.items():
        if getattr(s, key) not in allowed:
            raise ParamsError(f"{source}: key 'ssl.{key}' = {getattr(s, key)!r} must be one of {', '.join(allowed)}")
    if not e.label_fractions:
        raise bad("eval.label_fractions", e.label_fractions, "must list at least one fraction")
    q, c = p.search, p.classifier
    if q.method not in ("patchsearch", "poisoncam"):
        raise ParamsError(f"{source}: key 'search.method' = {q.method!r} must be one of patchsearch, poisoncam")
    if q.mask_strategy not in ("full", "random", "interval"):
        raise ParamsError(
            f"{source}: key 'search.mask_strategy' = {q.mask_strategy!r} must be one of full, random, interval"
        )
    if q.cam_layer not in ("layer1", "layer2", "layer3", "layer4"):
        raise ParamsError(
            f"{source}: key 'search.cam_layer' = {q.cam_layer!r} must be one of layer1, layer2, layer3, layer4"
        )
    if q.window_rule not in ("rsd", "contrast", "agreement", "pooled"):
        raise bad("search.window_rule", q.window_rule, "must be one of rsd, contrast, agreement, pooled")
    if p.cluster.order not in ("content", "file"):
        raise bad("cluster.order", p.cluster.order, "must be content or file")
    rules = ", ".join(SCORE_RULES[:-1]) + f" or {SCORE_RULES[-1]}"
    if q.score_rule is not None and q.score_rule not in SCORE_RULES:
        raise bad("search.score_rule", q.score_rule, f"must be null (each method's own) or one of {rules}")
    if q.poisoncam_score not in SCORE_RULES:
        raise bad("search.poisoncam_score", q.poisoncam_score, f"must be one of {rules}")
    if q.window_px is None and not q.window_sweep:
        raise bad("search.window_sweep", q.window_sweep, "must list window sides when search.window_px is null")
    lo_hi = c.paste_scale
    if len(lo_hi) != 2 or not lo_hi[0] < lo_hi[1]:
        raise bad("classifier.paste_scale", lo_hi, "must be [low, high] with 0 < low < high (sides relative to w)")
    for key in ("precision", "ssl_precision"):
        if getattr(p.compute, key) not in ("auto", "fp32", "bf16"):
            raise ParamsError(
                f"{source}: key 'compute.{key}' = {getattr(p.compute, key)!r} must be one of auto, fp32, bf16"
            )
    if p.mix.fill not in ("crop", "black", "noise"):
        raise bad("mix.fill", p.mix.fill, "must be one of crop, black, noise")
    if p.mix.loss not in ("weighted", "onehot"):
        raise bad("mix.loss", p.mix.loss, "must be one of weighted, onehot")
    if a.trigger != "random" and not str(a.trigger).strip():
        raise bad("attack.trigger", a.trigger, "must be random or the path of a PNG file")


def from_dict(raw: Any, source: str = "<params>") -> Params:
    params = _build(Params, raw, "", source)
    _check_ranges(params, source)
    for name in params.variants:
        with_variant(params, name, source)  # each variant, applied, must be valid params too
    return params


def with_overrides(params: Params, overrides: dict, source: str = "overrides") -> Params:
    """``params`` with some keys replaced, section by section (``{"cluster": {"k": 50}}``); an unknown
    section or key, or a value out of range, is refused with its name."""
    raw = params.to_dict()
    if not isinstance(overrides, dict):
        raise ParamsError(f"{source}: overrides must be a mapping of sections, got {overrides!r}")
    for section, values in overrides.items():
        if section == "variants" or not (isinstance(values, dict) and isinstance(raw.get(section), dict)):
            raise ParamsError(f"{source}: {section!r} is not a section of the params (e.g. {{'cluster': {{'k': 50}}}})")
        raw[section] = {**raw[section], **values}
    return from_dict(raw, f"{params.profile} + {source} {overrides}")


def with_variant(params: Params, name: str, source: str = "<params>") -> Params:
    """The params of the profile's variant ``name`` (``variants`` section): its overrides applied, no variants."""
    if name not in params.variants:
        known = ", ".join(params.variants) or "none"
        raise ParamsError(f"{source}: unknown variant '{name}' (the profile's variants: {known})")
    base = dataclasses.replace(params, variants={})
    return with_overrides(base, params.variants[name], f"{source} variants.{name}")


def load(path: str | Path) -> Params:
    """Read and validate a params file; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    return from_dict(raw if raw is not None else {}, str(path))


def dump(params: Params) -> str:
    return yaml.safe_dump(params.to_dict(), sort_keys=False)


def resolve_data_root(params: Params) -> Path:
    """The data root: ``data.root``, else ``$PATCHSEARCH_DATA_ROOT``, else the dataset's default place."""

    d = params.data
    how = paths.HOW_TO_GET_DATA.get(d.dataset, "set data.root or $PATCHSEARCH_DATA_ROOT")
    explicit = d.root or os.environ.get(paths.DATA_ROOT_ENV)
    if explicit:
        root = Path(explicit).expanduser()
        if not root.is_absolute():
            root = paths.REPO_ROOT / root
        if not root.is_dir():
            source = "data.root" if d.root else f"${paths.DATA_ROOT_ENV}"
            raise DataError(f"data root not found: {root} (from {source}); {how}")
        return root.resolve()
    candidates = paths.DEFAULT_DATA_ROOTS.get(d.dataset, [])
    for root in candidates:
        if root.is_dir():
            return root.resolve()
    looked = ", ".join(str(c) for c in candidates) or "nowhere (unknown dataset)"
    raise DataError(f"no data root for dataset '{d.dataset}': looked in {looked}; {how}")


def with_resolved_root(params: Params) -> Params:
    """The same params with ``data.root`` made absolute and ``auto`` precisions resolved to the precision
    this machine runs (``helpers.compute``), so cache keys say what they were made from."""
    from .compute import resolve_precision

    root = resolve_data_root(params)
    c = params.compute
    resolved = dataclasses.replace(
        c, precision=resolve_precision(c.precision), ssl_precision=resolve_precision(c.ssl_precision)
    )
    if "bf16" in (resolved.precision, resolved.ssl_precision):
        _warn_if_bf16_is_emulated(params.profile)
    return dataclasses.replace(params, data=dataclasses.replace(params.data, root=str(root)), compute=resolved)


@functools.cache
def _warn_if_bf16_is_emulated(profile: str) -> None:
    """Said once a process and profile: the shipped profiles ask for bf16 outright (not ``auto``), so that every
    machine's cache keys are those of the stages they ship; a CPU without AVX512-BF16 or AMX emulates it."""
    from .compute import resolve_precision

    if resolve_precision("auto") != "bf16":  # what auto would choose here: no native bf16
        logging.getLogger(__name__).warning(
            f"profile {profile!r} runs networks in bf16 and this machine has no native bf16 (on a CPU: no "
            "avx512_bf16 or amx_bf16 flag): its shipped stages are used as they are and the notebooks' own "
            "passes run in fp32 (notebook.live_precision), but a stage computed here emulates bf16, 20-26x slower "
            "than fp32 on an AVX2 CPU (measured 2026-12-08); for fp32 speed there, set compute.precision and "
            "compute.ssl_precision to fp32 in a copy of the profile (other cache keys, other numbers)"
        )


# Stages whose result depends on the precision of the networks they run: SSL pre-training runs in
# ``compute.ssl_precision``; every other network pass in ``compute.precision``.
NETWORK_STAGES = frozenset(s.name for s in stages.STAGES if s.network)
PRETRAINING_STAGES = frozenset(s.name for s in stages.STAGES if s.network == "pretraining")  # no other network


# Keys added to the schema after results were shipped: left out of a stage's params (its ``params.yaml`` and
# its cache key) while they hold this value, which computes what the code did before they existed, so those
# results keep their keys.
ADDED_LATER: dict[tuple[str, str], Any] = {
    ("search", "score_rule"): None,
    ("cluster", "order"): "file",
    ("search", "poisoncam_score"): "changed",
    ("classifier", "negative_paste"): 0.0,
    ("classifier", "exclude_top_clusters"): False,
}
# Keys added later that only one search method reads: left out of the params of a stage that runs the other.
ONE_METHOD: dict[tuple[str, str], str] = {("search", "poisoncam_score"): "poisoncam"}


def resolve_input_path(path: str | Path) -> Path:
    """A file named in a params file: absolute as given, else relative to the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else paths.REPO_ROOT / path


def stage_params(params: Params, stage: str) -> dict[str, Any]:
    """The params ``stage`` reads: its sections (``STAGE_INPUTS``) and, for stages that run networks, the
    precision they run in."""
    if stage not in STAGE_INPUTS:
        raise KeyError(f"unknown stage '{stage}' (known: {', '.join(STAGE_INPUTS)})")
    full = params.to_dict()
    out = {section: dict(full[section]) for section in STAGE_INPUTS[stage]}
    for (section, key), value in ADDED_LATER.items():
        if section in out and out[section].get(key, value) == value:
            out[section].pop(key, None)
    for (section, key), method in ONE_METHOD.items():
        if section in out and out[section].get("method") != method:
            out[section].pop(key, None)
    if stage in PRETRAINING_STAGES:
        out["compute"] = {"ssl_precision": full["compute"]["ssl_precision"]}
    elif stage in NETWORK_STAGES:
        out["compute"] = {key: full["compute"][key] for key in ("precision", "ssl_precision")}
    return out


def stage_key_material(params: Params, stage: str) -> dict[str, Any]:
    """Everything the stage's cache key hashes: its params, with the data root replaced by a manifest of
    the data files and a trigger PNG by its content, and the fingerprint of the code the stage runs."""
    from . import fingerprint

    material = stage_params(params, stage)
    d = material["data"] = dict(material["data"])
    if d.get("root"):
        d["root"] = "manifest:" + fingerprint.data_manifest(d["root"], (d["train_split"], d["val_split"]))
    if "attack" in material and material["attack"]["trigger"] != "random":
        trigger = resolve_input_path(material["attack"]["trigger"])
        if trigger.is_file():  # a missing file is reported by the attack, with the key that names it
            material["attack"] = {**material["attack"], "trigger": "sha256:" + fingerprint.file_fingerprint(trigger)}
    if stage in NETWORK_STAGES:  # what "auto" means on this machine, as the stage will run it
        from .compute import resolve_precision

        material["compute"] = {key: resolve_precision(value) for key, value in material["compute"].items()}
    return {"params": material, "code": fingerprint.code_fingerprint(stage)}


def key_of(material: dict[str, Any]) -> str:
    """The cache key of a stage's key material (``stage_key_material``)."""
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_hash(params: Params, stage: str) -> str:
    return key_of(stage_key_material(params, stage))
