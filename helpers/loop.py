"""The SSL training loop for a method built elsewhere: the trainings of notebook 08 (a student distilled
from a teacher, i-CutMix with other boxes or another loss) run the models they build through it.

It is ``helpers.train.train_ssl`` in one process: the same generators seeded by (seed, epoch, rank), the
same per-epoch atomic checkpoints and exact resume, the same optimiser and schedule. Given the model
``train_ssl`` would build, it trains the same weights (``tests/test_more_defenses.py`` checks this).
The loop is separate so that adding these methods leaves the published stages' code, and so their cache
keys and shipped checkpoints, untouched (``helpers.fingerprint``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import io
from .augment import BatchAugment
from .compute import autocast, device_for_run, resolve_precision
from .params import SSLParams
from .train import (
    _optimizer,
    augment_config,
    check_loss,
    epoch_generator,
    load_checkpoint,
    lr_at,
    save_checkpoint,
)


def train_method(
    pixels: torch.Tensor,
    model: torch.nn.Module,
    p: SSLParams,
    checkpoint_dir: Path,
    progress: bool = True,
    precision: str = "fp32",
    mix: bool = False,
    desc: str | None = None,
) -> list[dict]:
    """Train ``model`` (``forward(view1, view2, mix_generator) -> loss``, ``momentum_update()``) on ``pixels``
    (uint8 ``N x 3 x H x W``) with ``p``'s optimiser, schedule, batch size, epochs and augmentation; ``mix``
    hands the method the generator its mixing draws from (i-CutMix). Returns the history; the model is
    trained in place. Build ``model`` right after ``torch.manual_seed(p.seed)``, as ``train_ssl`` does."""
    device = device_for_run()
    precision = resolve_precision(precision, device)
    image_size = pixels.shape[-1]
    model = model.to(device).to(memory_format=torch.channels_last)
    augment = BatchAugment(augment_config(p, image_size))
    optimizer = _optimizer(model, p, 1)
    base_lr = optimizer.param_groups[0]["lr"]
    steps = len(pixels) // p.batch_size
    if steps == 0:
        raise ValueError(f"batch size {p.batch_size} exceeds the {len(pixels)} training images")
    total, warmup = p.epochs * steps, p.warmup_epochs * steps
    start_epoch, history = 0, []
    resumed = load_checkpoint(checkpoint_dir, device)
    if resumed is not None:
        state, history = resumed
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"]
    model.train()
    for epoch in range(start_epoch, p.epochs):
        g = epoch_generator(p.seed, epoch, 0)
        order = torch.randperm(len(pixels), generator=g)
        g_aug = epoch_generator(p.seed, epoch, 1)
        start, losses = time.perf_counter(), []
        name = f"{desc or p.method} epoch {epoch + 1}/{p.epochs}"
        bar = tqdm(range(steps), desc=name, disable=not progress, leave=False)
        for step in bar:
            global_step = epoch * steps + step
            for group in optimizer.param_groups:
                group["lr"] = lr_at(global_step, total, warmup, base_lr)
            if hasattr(model, "set_progress"):
                model.set_progress(global_step / total)
            batch = pixels[order[step * p.batch_size : (step + 1) * p.batch_size]].to(device, non_blocking=True)
            v1 = augment(batch, g_aug).contiguous(memory_format=torch.channels_last)
            v2 = augment(batch, g_aug).contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                loss = model(v1, v2, mix_generator=g_aug if mix else None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.momentum_update()
            losses.append(loss.item())
            check_loss(losses[-1], p, epoch + 1, step)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        seconds = time.perf_counter() - start
        history.append(
            {
                "epoch": epoch + 1,
                "loss": sum(losses) / len(losses),
                "seconds": seconds,
                "images_per_s": steps * p.batch_size / seconds,
            }
        )
        if progress:
            tqdm.write(f"{desc or p.method} epoch {epoch + 1}/{p.epochs}: loss {history[-1]['loss']:.4f}")
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1}
        save_checkpoint(checkpoint_dir, state, history)
    return history


def write_model(out: Path, backbone: torch.nn.Module, history: list[dict], precision: str) -> None:
    """A model stage's files, as the ``ssl_*`` stages write them: the backbone and the training history."""
    io.save_weights(out / "backbone.safetensors", backbone.state_dict(), {"precision": precision})
    io.write_json(out / "history.json", history)
    io.write_text(out / "history.csv", pd.DataFrame(history).to_csv(index=False))
