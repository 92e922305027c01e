"""Self-supervised methods: MoCo-v2, BYOL, SimCLR (ResNet) and MoCo-v3 (ViT), with the i-CutMix option.

Each method is an ``nn.Module`` whose ``forward(view1, view2)`` returns the loss for a batch of two
augmented views; ``backbone`` is the encoder whose features are evaluated (and defended) later;
``momentum_update()`` is called after each optimiser step where the method has a momentum encoder.

i-CutMix (Lee et al., i-Mix, ICLR 2021, as kibok90/imix and PatchSearch's MoCo-v3 code use it): one
lambda ~ Beta(1, 1) per batch, lambda = max(lambda, 1 - lambda); one box for the whole batch; the partner
of sample i is perm[i] for a random permutation; lambda is recomputed from the clipped box area; the
query view is mixed, the keys come from the unmixed other view, and the loss is
lambda * loss(own key) + (1 - lambda) * loss(partner's key).

Under bf16 autocast the networks run in bf16; every embedding is cast to fp32 before it is normalised,
and the losses (similarities, softmax, cross-entropy) run in fp32 (``helpers.compute.fp32_region``).

The training loop (``train_ssl``) and notebook 02's cached stage (``train_stage``): vectorised augmentation on
the device, per-epoch atomic checkpoints, exact resume, torch DDP through ``torchrun`` (gloo on CPU, NCCL on
GPU); a single process needs no launcher.

    torchrun --nproc_per_node 2 -m helpers.runners.pipeline --params params/cifar10.yaml --task ssl_poisoned

Randomness is drawn from generators seeded by (seed, epoch, rank), so a run killed at any point and
resumed from its last checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import io
from .attack import poisoned_train_pixels, run_attack
from .augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, BatchAugment
from .cache import partial_dir, resumable_stage, stage_dir
from .compute import autocast, check_finite, device_for_run, fp32_region, resolve_precision
from .data import load_data
from .models import backbone_for
from .params import Params, SSLParams


def mlp(dims: list[int], bn_last: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        last = i == len(dims) - 2
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=last and not bn_last))
        if not last:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
        elif bn_last:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=False))
    return nn.Sequential(*layers)


def cutmix_box(height: int, width: int, generator: torch.Generator | None = None):
    """One box and lambda for a batch, as in i-Mix: lambda ~ Beta(1,1) folded to >= 0.5, a box of area
    (1 - lambda) centred uniformly, clipped to the image, lambda recomputed from the clipped area."""
    lam = float(torch.rand(1, generator=generator))  # Beta(1, 1) is uniform
    lam = max(lam, 1 - lam)
    cut = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(torch.randint(height, (1,), generator=generator)), int(torch.randint(width, (1,), generator=generator))
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    lam = 1 - (y2 - y1) * (x2 - x1) / (height * width)
    return (y1, y2, x1, x2), lam


def icutmix(x: torch.Tensor, generator: torch.Generator | None = None):
    """Paste the partner's box into each image: returns (mixed, perm, lambda)."""
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    (y1, y2, x1, x2), lam = cutmix_box(x.shape[2], x.shape[3], generator)
    mixed = x.clone()
    mixed[:, :, y1:y2, x1:x2] = x[perm][:, :, y1:y2, x1:x2]
    return mixed, perm, lam


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather across DDP processes (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class _Momentum(nn.Module):
    """An online network and its exponential-moving-average copy (target / key encoder)."""

    def _make_target(self, *modules: nn.Module) -> None:
        self.online = nn.ModuleList(modules)
        self.target = copy.deepcopy(self.online)
        for p in self.target.parameters():
            p.requires_grad = False

    @torch.no_grad()
    def momentum_update(self, m: float | None = None) -> None:
        m = self.m if m is None else m
        for po, pt in zip(self.online.parameters(), self.target.parameters(), strict=True):
            pt.mul_(m).add_(po.detach(), alpha=1 - m)
        for bo, bt in zip(self.online.buffers(), self.target.buffers(), strict=True):
            bt.copy_(bo)


class MoCoV2(_Momentum):
    """MoCo-v2 (Chen et al. 2020): MLP head, momentum key encoder, a queue of negative keys, InfoNCE.
    ``symmetric`` adds the loss with the views swapped (common at small budgets). No shuffled BN: with
    one process there is nothing to shuffle across; BN statistics come from the whole batch."""

    def __init__(
        self,
        backbone: nn.Module,
        dim: int = 128,
        hidden: int = 512,
        queue_size: int = 4096,
        m: float = 0.99,
        temperature: float = 0.2,
        symmetric: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self._make_target(backbone, mlp([backbone.feature_dim, hidden, dim]))
        self.m, self.t, self.symmetric = m, temperature, symmetric
        self.mix = icutmix  # how the query views are mixed under i-CutMix (helpers.mixing swaps it)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _embed(self, nets: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(nets[1](nets[0](x)).float(), dim=1)

    def _loss(self, q, k, negatives, perm=None, lam=1.0):
        with fp32_region(q.device):
            if perm is None:  # MoCo-v2: the own key is the positive, the queue holds the negatives
                logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.T], dim=1) / self.t
                return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
            # i-CutMix: the batch keys join the negatives so the partner's key can be a (weighted) positive
            logits = torch.cat([q @ k.T, q @ negatives.T], dim=1) / self.t
            own = torch.arange(len(q), device=q.device)
            return lam * F.cross_entropy(logits, own) + (1 - lam) * F.cross_entropy(logits, perm)

    def forward(self, v1, v2, mix_generator: torch.Generator | None = None):
        pairs = [(v1, v2), (v2, v1)] if self.symmetric else [(v1, v2)]
        loss, keys = 0.0, []
        negatives = self.queue.clone()  # the queue is updated below, before the backward pass
        for a, b in pairs:
            perm, lam = None, 1.0
            if mix_generator is not None:
                a, perm, lam = self.mix(a, mix_generator)
            q = self._embed(self.online, a)
            with torch.no_grad():
                k = self._embed(self.target, b)
            loss = loss + self._loss(q, k, negatives, perm, lam)
            keys.append(k)
        self._enqueue(gather(torch.cat(keys)))
        return loss / len(pairs)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        size = len(self.queue)
        keys = keys[-size:]
        ptr = int(self.queue_ptr)
        idx = (torch.arange(len(keys), device=keys.device) + ptr) % size
        self.queue[idx] = keys
        self.queue_ptr.fill_((ptr + len(keys)) % size)


class BYOL(_Momentum):
    """BYOL (Grill et al. 2020): projector and predictor with BN, momentum target, symmetric
    ``2 - 2 cos`` loss. The momentum follows the cosine schedule m -> 1 via ``set_progress``."""

    def __init__(self, backbone: nn.Module, dim: int = 256, hidden: int = 1024, m: float = 0.99) -> None:
        super().__init__()
        self.backbone = backbone
        self._make_target(backbone, mlp([backbone.feature_dim, hidden, dim]))
        self.predictor = mlp([dim, hidden, dim])
        self.base_m = self.m = m

    def set_progress(self, fraction: float) -> None:
        self.m = 1 - (1 - self.base_m) * (math.cos(math.pi * fraction) + 1) / 2

    def _online(self, x):
        return F.normalize(self.predictor(self.online[1](self.online[0](x))).float(), dim=1)

    def _target(self, x):
        with torch.no_grad():
            return F.normalize(self.target[1](self.target[0](x)).float(), dim=1)

    def forward(self, v1, v2, mix_generator: torch.Generator | None = None):
        loss = 0.0
        for a, b in [(v1, v2), (v2, v1)]:
            z = self._target(b)
            if mix_generator is None:
                p = self._online(a)
                with fp32_region(p.device):
                    loss = loss + (2 - 2 * (p * z).sum(1)).mean()
            else:
                a, perm, lam = icutmix(a, mix_generator)
                p = self._online(a)
                with fp32_region(p.device):
                    own, partner = (2 - 2 * (p * z).sum(1)), (2 - 2 * (p * z[perm]).sum(1))
                    loss = loss + (lam * own + (1 - lam) * partner).mean()
        return loss / 2


class SimCLR(nn.Module):
    """SimCLR (Chen et al. 2020): NT-Xent over the 2B views of a batch (other samples' views are negatives)."""

    def __init__(self, backbone: nn.Module, dim: int = 128, hidden: int = 512, temperature: float = 0.2) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = mlp([backbone.feature_dim, hidden, dim])
        self.t = temperature

    def momentum_update(self, m=None) -> None:  # no momentum encoder
        pass

    def forward(self, v1, v2, mix_generator: torch.Generator | None = None):
        if mix_generator is not None:
            raise ValueError("ssl.icutmix is implemented for mocov2, byol and mocov3, not simclr")
        z = F.normalize(self.head(self.backbone(torch.cat([v1, v2]))).float(), dim=1)
        n = len(v1)
        with fp32_region(z.device):
            sim = z @ z.T / self.t
            sim.fill_diagonal_(float("-inf"))
            targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
            return F.cross_entropy(sim, targets)


class MoCoV3(_Momentum):
    """MoCo-v3 (Chen et al. 2021): projector and predictor (BN MLPs), momentum encoder, in-batch keys,
    symmetric InfoNCE scaled by 2T. Used with a ViT backbone."""

    def __init__(
        self, backbone: nn.Module, dim: int = 256, hidden: int = 1024, m: float = 0.99, temperature: float = 0.2
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self._make_target(backbone, mlp([backbone.feature_dim, hidden, hidden, dim], bn_last=True))
        self.predictor = mlp([dim, hidden, dim], bn_last=True)
        self.base_m = self.m = m
        self.t = temperature

    def set_progress(self, fraction: float) -> None:
        self.m = 1 - (1 - self.base_m) * (math.cos(math.pi * fraction) + 1) / 2

    def forward(self, v1, v2, mix_generator: torch.Generator | None = None):
        loss = 0.0
        for a, b in [(v1, v2), (v2, v1)]:
            perm, lam = None, 1.0
            if mix_generator is not None:
                a, perm, lam = icutmix(a, mix_generator)
            q = F.normalize(self.predictor(self.online[1](self.online[0](a))).float(), dim=1)
            with torch.no_grad():
                k = gather(F.normalize(self.target[1](self.target[0](b)).float(), dim=1))
            offset = len(q) * (dist.get_rank() if dist.is_available() and dist.is_initialized() else 0)
            with fp32_region(q.device):
                logits = q @ k.T / self.t
                own = torch.arange(len(q), device=q.device) + offset
                ce = F.cross_entropy(logits, own)
                if perm is not None:
                    ce = lam * ce + (1 - lam) * F.cross_entropy(logits, perm + offset)
                loss = loss + 2 * self.t * ce
        return loss


def build_method(method: str, backbone: nn.Module, **kw) -> nn.Module:
    methods = {"mocov2": MoCoV2, "byol": BYOL, "simclr": SimCLR, "mocov3": MoCoV3}
    if method not in methods:
        raise ValueError(f"ssl.method must be one of {', '.join(methods)}, got {method!r}")
    return methods[method](backbone, **kw)


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
    if device.type == "cuda":  # the shapes never change: let cuDNN time its algorithms once and keep the fastest
        torch.backends.cudnn.benchmark = True
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
    returns, asked only when the model must be trained: ``classify.filtered_model_stage`` passes the
    defense's list (a later stage's result, which this module never imports).
    Checkpoints live beside it in ``<hash>.partial/`` until the model is complete, so a killed run resumes
    where it stopped."""
    if variant not in ("clean", "poisoned", "filtered"):
        raise ValueError(f"variant must be 'clean', 'poisoned' or 'filtered', got {variant!r}")
    if icutmix is not None:
        params = dataclasses.replace(params, ssl=dataclasses.replace(params.ssl, icutmix=icutmix))
    stage = f"ssl_{variant}"
    rank, _ = dist_info()

    def training_pixels() -> torch.Tensor:
        data = load_data(params, progress=progress)
        if variant == "clean":
            return data.train.tensor()
        pixels = poisoned_train_pixels(data, run_attack(params, data, progress), params.data.image_size)
        if variant == "filtered":  # the poisoned set minus what the defense of params.search.method removed
            if keep is None:
                raise ValueError("ssl_filtered trains on a defense's list: call classify.filtered_model_stage")
            pixels = pixels[torch.as_tensor(keep())]
        return pixels

    c = params.compute
    if rank > 0:  # other DDP ranks train alongside rank 0, which alone writes the stage folder
        if not (stage_dir(params, stage) / "params.yaml").is_file():
            work = partial_dir(stage_dir(params, stage))
            train_ssl(training_pixels(), params.ssl, work, progress=False, precision=c.ssl_precision, compile=c.compile)
        return stage_dir(params, stage)

    def compute(out: Path, final: Path, work: Path) -> None:
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

    return resumable_stage(stage, params, compute).path


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
