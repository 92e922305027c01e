"""SSL training loop: vectorised augmentation on the device, per-epoch atomic checkpoints, exact resume,
torch DDP through ``torchrun`` (gloo on CPU, NCCL on GPU); a single process needs no launcher.

    torchrun --nproc_per_node 2 -m helpers.train --params params/cifar10.yaml --variant poisoned

Randomness is drawn from generators seeded by (seed, epoch, rank), so a run killed at any point and
resumed from its last checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import io
from .attack import poisoned_train_pixels, run_attack
from .augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, BatchAugment
from .cache import cached_stage, stage_dir
from .compute import autocast, device_for_run, resolve_precision
from .data import load_data
from .models import build_backbone
from .params import Params, SSLParams
from .ssl import build_method


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def backbone_for(p: SSLParams, image_size: int) -> torch.nn.Module:
    return build_backbone(
        p.arch, image_size, p.width, p.stem, p.stem_stride, p.vit_patch, p.vit_dim, p.vit_depth, p.vit_heads
    )


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
) -> tuple[torch.nn.Module, list[dict]]:
    """Train ``p.method`` on ``pixels`` (uint8 ``N x 3 x H x W``). Resumes from ``checkpoint_dir/last.pt``.

    ``precision`` (``fp32`` / ``bf16`` / ``auto``) is that of the forward and backward passes
    (``helpers.compute``); ``compile`` compiles its networks with ``torch.compile`` (off by default: ``make
    bench`` measures its speed, not yet its effect on results).
    ``on_step(epoch, step)`` is called before every step (tests use it to kill a run mid-epoch);
    ``on_epoch_end(epoch, model, history)`` after every epoch's checkpoint (the study evaluates there)."""
    rank, world = dist_info()
    device = device_for_run()
    precision = resolve_precision(precision, device)
    torch.manual_seed(p.seed)  # the initial weights
    image_size = pixels.shape[-1]
    model = build_model(p, image_size).to(device).to(memory_format=torch.channels_last)
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
        bar = tqdm(
            range(steps), desc=f"{p.method} epoch {epoch + 1}/{p.epochs}", disable=not progress or rank > 0, leave=False
        )
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
            tqdm.write(
                f"{p.method} epoch {epoch + 1}/{p.epochs}: loss {history[-1]['loss']:.4f}, "
                f"{history[-1]['images_per_s']:.0f} img/s"
            )
        if rank == 0:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1}
            save_checkpoint(checkpoint_dir, state, history)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, model, history)
            model.train()
        if world > 1:
            dist.barrier()
    return model, history


class TrainingDiverged(RuntimeError):
    """A training whose loss became NaN or infinite: it stops at that step, and nothing of it is cached.
    The cache puts the stage's name in front of the message (``names_stage``)."""

    names_stage = True


def check_finite(loss: float, where: str, keys: dict[str, object]) -> None:
    """Raise ``TrainingDiverged`` where ``loss`` is not finite: ``where`` names the training and the step,
    ``keys`` the params most likely at fault with their values. Every trainer of the project calls it."""
    if not math.isfinite(loss):
        at_fault = ", ".join(f"{key} = {value}" for key, value in keys.items())
        raise TrainingDiverged(
            f"{where}: the loss is {loss}, the training diverged; the keys most likely at fault: {at_fault} "
            "(nothing of this training is cached)"
        )


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
) -> Path:
    """The cached ``ssl_clean`` / ``ssl_poisoned`` / ``ssl_filtered`` stage: train on the clean, the poisoned
    or the defended (filtered) training set and return the stage folder (``backbone.safetensors``,
    ``history.json`` and ``history.csv``).
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
            from .defense import kept_indices

            pixels = pixels[torch.as_tensor(kept_indices(params, progress))]
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
        io.save_weights(out / "backbone.safetensors", model.backbone.state_dict(), {"precision": c.ssl_precision})
        io.write_json(out / "history.json", history)
        io.write_text(out / "history.csv", pd.DataFrame(history).to_csv(index=False))

    result = cached_stage(stage, params, compute)
    shutil.rmtree(work, ignore_errors=True)
    return result.path


def load_backbone(params: Params, stage_path: Path, image_size: int) -> torch.nn.Module:
    """The trained backbone of an ``ssl_*`` stage folder, in eval mode, on the run's device."""
    backbone = backbone_for(params.ssl, image_size)
    backbone.load_state_dict(io.load_weights(stage_path / "backbone.safetensors"))
    return backbone.to(device_for_run()).eval()


def main(argv: list[str] | None = None) -> None:
    """Train one SSL model of a profile (``--variant clean|poisoned``), under torchrun or alone."""

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", required=True)
    parser.add_argument("--variant", choices=["clean", "poisoned", "filtered"], default="poisoned")
    parser.add_argument("--method", choices=["patchsearch", "poisoncam"], default=None, help="defense (filtered)")
    parser.add_argument("--icutmix", action="store_true")
    args = parser.parse_args(argv)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    from .notebook import setup

    params = setup(args.params)
    if args.method:
        params = dataclasses.replace(params, search=dataclasses.replace(params.search, method=args.method))
    result = train_stage(params, args.variant, icutmix=args.icutmix)
    if dist_info()[0] == 0:
        print(f"model: {result}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
