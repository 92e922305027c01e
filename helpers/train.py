"""SSL training loop: vectorised augmentation on the device, per-epoch atomic checkpoints, exact resume,
torch DDP through ``torchrun`` (gloo on CPU, NCCL on GPU); a single process needs no launcher.

    torchrun --nproc_per_node 2 -m helpers.pipeline --params params/cifar10.yaml --task ssl_poisoned

Randomness is drawn from generators seeded by (seed, epoch, rank), so a run killed at any point and
resumed from its last checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import io
from .attack import poisoned_train_pixels, run_attack
from .augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, BatchAugment
from .cache import cached_stage, stage_dir
from .compute import TrainingDiverged, autocast, check_finite, device_for_run, resolve_precision  # noqa: F401
from .data import load_data
from .models import backbone_for, build_backbone  # noqa: F401 (backbone_for: read from here too)
from .params import Params, SSLParams
from .ssl import build_method


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_model(p: SSLParams, image_size: int) -> torch.nn.Module:
    backbone = backbone_for(p, image_size)
    kw = {"dim": p.proj_dim, "hidden": p.proj_hidden}
    if p.method in ("mocov2", "simclr", "mocov3"):
        kw["temperature"] = p.temperature
    if p.method in ("mocov2", "byol", "mocov3"):
        kw["m"] = p.momentum
    if p.method == "mocov2":
        kw |= {"queue_size": p.queue_size, "symmetric": p.symmetric}
    return build_method(p.method, backbone, **kw)


def augment_config(p: SSLParams, image_size: int) -> AugmentConfig:
    imagenet = image_size > 64
    return AugmentConfig(
        size=image_size,
        crop_scale=(p.crop_min_scale, 1.0),
        blur_p=p.blur_p,
        mean=IMAGENET_MEAN if imagenet else AugmentConfig.mean,
        std=IMAGENET_STD if imagenet else AugmentConfig.std,
    )


def _optimizer(model: torch.nn.Module, p: SSLParams, world: int) -> torch.optim.Optimizer:
    lr = p.lr * p.batch_size * world / 256  # linear scaling rule: ssl.lr is per 256 images
    params = [q for q in model.parameters() if q.requires_grad]
    if p.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=p.weight_decay)
    if p.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=p.weight_decay)
    raise ValueError(f"ssl.optimizer must be sgd or adamw, got {p.optimizer!r}")


def networks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The method's networks (backbones, heads, predictor), each once: the units ``compile`` compiles."""
    found: dict[int, torch.nn.Module] = {}
    for child in model.children():
        for net in child if isinstance(child, torch.nn.ModuleList) else [child]:
            found.setdefault(id(net), net)
    return list(found.values())


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009 + rank)


def save_checkpoint(checkpoint_dir: Path, state: dict, history: list[dict]) -> None:
    """The resumable state: ``last.pt`` (weights and optimiser state only, loadable with
    ``weights_only=True``) and ``last.json`` (the history), each written atomically, JSON first."""
    io.write_json(checkpoint_dir / "last.json", {"epoch": state["epoch"], "history": history})
    io.save_state(checkpoint_dir / "last.pt", state)


def load_checkpoint(checkpoint_dir: Path, device: torch.device) -> tuple[dict, list[dict]] | None:
    """The state and history of ``save_checkpoint``, or None when there is none yet."""
    if not (checkpoint_dir / "last.pt").is_file():
        return None
    state = io.load_state(checkpoint_dir / "last.pt", map_location=device)
    meta = json.loads((checkpoint_dir / "last.json").read_text())
    return state, meta["history"][: state["epoch"]]  # a crash between the two writes leaves JSON ahead


def train_ssl(
    pixels: torch.Tensor,
    p: SSLParams,
    checkpoint_dir: Path,
    progress: bool = True,
    on_step: Callable[[int, int], None] | None = None,
    on_epoch_end: Callable[[int, torch.nn.Module, list[dict]], None] | None = None,
    precision: str = "fp32",
    compile: bool = False,
    model: torch.nn.Module | None = None,
    desc: str | None = None,
) -> tuple[torch.nn.Module, list[dict]]:
    """Train ``p.method`` on ``pixels`` (uint8 ``N x 3 x H x W``). Resumes from ``checkpoint_dir/last.pt``.

    ``model``: a method built elsewhere instead (notebook 08: a student distilled from a teacher, MoCo-v2 with
    another i-CutMix box or loss), with ``forward(view1, view2, mix_generator) -> loss`` and
    ``momentum_update()``; build it right after ``torch.manual_seed(<its seed>)``, as this function builds
    ``p.method``'s. It trains with ``p``'s optimiser, schedule, batch size, epochs and augmentation, and with
    the mixing generator where ``p.icutmix``. ``desc`` names the training in the progress bar.

    ``precision`` (``fp32`` / ``bf16`` / ``auto``) is that of the forward and backward passes
    (``helpers.compute``); ``compile`` compiles its networks with ``torch.compile`` (off by default: ``make
    bench`` measures its speed, not yet its effect on results).
    ``on_step(epoch, step)`` is called before every step (tests use it to kill a run mid-epoch);
    ``on_epoch_end(epoch, model, history)`` after every epoch's checkpoint (the study evaluates there)."""
    rank, world = dist_info()
    device = device_for_run()
    precision = resolve_precision(precision, device)
    image_size = pixels.shape[-1]
    if model is None:
        torch.manual_seed(p.seed)  # the initial weights
        model = build_model(p, image_size)
    model = model.to(device).to(memory_format=torch.channels_last)
    augment = BatchAugment(augment_config(p, image_size))
    optimizer = _optimizer(model, p, world)
    base_lr = optimizer.param_groups[0]["lr"]
    per_step = p.batch_size * world
    steps = len(pixels) // per_step
    if steps == 0:
        raise ValueError(f"ssl.batch_size = {p.batch_size} x {world} processes exceeds the {len(pixels)} images")
    total, warmup = p.epochs * steps, p.warmup_epochs * steps
    start_epoch, history = 0, []
    resumed = load_checkpoint(checkpoint_dir, device)
    if resumed is not None:
        state, history = resumed
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"]
    trainer = model
    if world > 1:
        trainer = torch.nn.parallel.DistributedDataParallel(model)  # BN buffers follow rank 0
    if compile:  # the networks only (in place: state-dict keys unchanged); the losses and the queue stay eager
        for net in networks(model):
            net.compile()
    model.train()
    for epoch in range(start_epoch, p.epochs):
        g = epoch_generator(p.seed, epoch, 0)
        order = torch.randperm(len(pixels), generator=g)  # the same on every rank
        g_rank = epoch_generator(p.seed, epoch, 1 + rank)  # augmentation and mixing: per rank
        start, losses = time.perf_counter(), []
        name = f"{desc or p.method} epoch {epoch + 1}/{p.epochs}"
        bar = tqdm(range(steps), desc=name, disable=not progress or rank > 0, leave=False)
        for step in bar:
            if on_step:
                on_step(epoch, step)
            global_step = epoch * steps + step
            for group in optimizer.param_groups:
                group["lr"] = lr_at(global_step, total, warmup, base_lr)
            if hasattr(model, "set_progress"):
                model.set_progress(global_step / total)
            idx = order[step * per_step + rank * p.batch_size : step * per_step + (rank + 1) * p.batch_size]
            batch = pixels[idx].to(device, non_blocking=True)
            v1 = augment(batch, g_rank).contiguous(memory_format=torch.channels_last)
            v2 = augment(batch, g_rank).contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):  # the losses inside leave autocast: fp32
                loss = trainer(v1, v2, mix_generator=g_rank if p.icutmix else None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.momentum_update()
            losses.append(loss.item())
            check_loss(losses[-1], p, epoch + 1, step)
            rate = (step + 1) * per_step / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", img_s=f"{rate:.0f}")
        seconds = time.perf_counter() - start
        history.append(
            {
                "epoch": epoch + 1,
                "loss": sum(losses) / len(losses),
                "seconds": seconds,
                "images_per_s": steps * per_step / seconds,
            }
        )
        if progress and rank == 0:
            tqdm.write(f"{name}: loss {history[-1]['loss']:.4f}, {history[-1]['images_per_s']:.0f} img/s")
        if rank == 0:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1}
            save_checkpoint(checkpoint_dir, state, history)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, model, history)
            model.train()
        if world > 1:
            dist.barrier()
    return model, history


def check_loss(loss: float, p: SSLParams, epoch: int, step: int) -> None:
    """``check_finite`` for an SSL training step."""
    keys = {"ssl.lr": p.lr, "ssl.temperature": p.temperature, "ssl.weight_decay": p.weight_decay}
    check_finite(loss, f"{p.method} at epoch {epoch}, step {step + 1}", keys)


def train_stage(
    params: Params,
    variant: str,
    icutmix: bool | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[int, torch.nn.Module, list[dict]], None] | None = None,
    keep: Callable[[], np.ndarray] | None = None,
) -> Path:
    """The cached ``ssl_clean`` / ``ssl_poisoned`` / ``ssl_filtered`` stage: train on the clean, the poisoned
    or the defended (filtered) training set and return the stage folder (``backbone.safetensors``,
    ``history.json`` and ``history.csv``). The filtered set is the poisoned set at the indices ``keep()``
    returns, asked only when the model must be trained: ``defense.filtered_model_stage`` passes the
    defense's list (a later stage's result, which this module never imports).
    Checkpoints live beside it in ``<hash>.partial/`` until the model is complete, so a killed run resumes
    where it stopped."""
    if variant not in ("clean", "poisoned", "filtered"):
        raise ValueError(f"variant must be 'clean', 'poisoned' or 'filtered', got {variant!r}")
    if icutmix is not None:
        params = dataclasses.replace(params, ssl=dataclasses.replace(params.ssl, icutmix=icutmix))
    stage = f"ssl_{variant}"
    work = stage_dir(params, stage).with_suffix(".partial")
    rank, _ = dist_info()

    def training_pixels() -> torch.Tensor:
        data = load_data(params, progress=progress)
        if variant == "clean":
            return data.train.tensor()
        pixels = poisoned_train_pixels(data, run_attack(params, data, progress), params.data.image_size)
        if variant == "filtered":  # the poisoned set minus what the defense of params.search.method removed
            if keep is None:
                raise ValueError("ssl_filtered trains on a defense's list: call defense.filtered_model_stage")
            pixels = pixels[torch.as_tensor(keep())]
        return pixels

    c = params.compute
    if rank > 0:  # other DDP ranks train alongside rank 0, which alone writes the stage folder
        if not (stage_dir(params, stage) / "params.yaml").is_file():
            train_ssl(training_pixels(), params.ssl, work, progress=False, precision=c.ssl_precision, compile=c.compile)
        return stage_dir(params, stage)

    def compute(out: Path, final: Path) -> None:
        if c.threads:
            torch.set_num_threads(c.threads)
        model, history = train_ssl(
            training_pixels(),
            params.ssl,
            work,
            progress,
            on_epoch_end=on_epoch_end,
            precision=c.ssl_precision,
            compile=c.compile,
        )
        write_model(out, model.backbone, history, c.ssl_precision)

    result = cached_stage(stage, params, compute)
    shutil.rmtree(work, ignore_errors=True)
    return result.path


def write_model(out: Path, backbone: torch.nn.Module, history: list[dict], precision: str) -> None:
    """A model stage's files: the backbone and the training history (every stage that trains one)."""
    io.save_weights(out / "backbone.safetensors", backbone.state_dict(), {"precision": precision})
    io.write_json(out / "history.json", history)
    io.write_text(out / "history.csv", pd.DataFrame(history).to_csv(index=False))


def load_backbone(params: Params, stage_path: Path, image_size: int) -> torch.nn.Module:
    """The trained backbone of an ``ssl_*`` stage folder, in eval mode, on the run's device."""
    backbone = backbone_for(params.ssl, image_size)
    backbone.load_state_dict(io.load_weights(stage_path / "backbone.safetensors"))
    return backbone.to(device_for_run()).eval()
