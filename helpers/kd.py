"""The trusted-data defense PatchSearch compares with (Table 3): knowledge distillation of the backdoored
model into a fresh student on clean data the defender trusts (Saha et al., CVPR 2022, who distil with
CompRess, Abbasi Koohpayegani et al. 2020).

The student never sees the poisoned set, only ``kd.trusted`` of the training images in their clean form;
the hope is that it inherits the teacher's features but not the trigger, which the trusted images never
show. The loss is CompRess's one-queue form: for each augmented view, the teacher's embedding and the
student's (through a linear head to the teacher's width) are compared with a queue of the teacher's recent
embeddings; the student's softmax similarity distribution over the queue is pulled to the teacher's
(KL divergence, temperature ``kd.temperature`` for both). Both are L2-normalised backbone features: what the
linear probe reads. The student trains with the SSL profile's optimiser, schedule and augmentations, for
``kd.epochs`` passes over the trusted images in batches of ``kd.batch_size`` (at most all of them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cache import resumable_stage
from .compute import fp32_region
from .data import load_data
from .models import backbone_for
from .params import Params
from .ssl import load_backbone, train_ssl, train_stage, write_model

TABLE3_TRUSTED = (0.25, 0.10, 0.05)  # the trusted shares of the paper's Table 3


class Distiller(nn.Module):
    """A student backbone (``backbone``, the network kept) learning a frozen teacher's similarity structure."""

    def __init__(self, teacher: nn.Module, student: nn.Module, queue_size: int = 512, temperature: float = 0.04):
        super().__init__()
        self.backbone, self.teacher, self.t = student, teacher, temperature
        self.head = nn.Linear(student.feature_dim, teacher.feature_dim)
        for q in self.teacher.parameters():
            q.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, teacher.feature_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()  # its batch-norm statistics stay the teacher's
        return self

    def momentum_update(self, m: float | None = None) -> None:  # nothing moves but the student
        pass

    def loss(self, teacher_z: torch.Tensor, student_z: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        """KL(teacher's distribution over the queue || student's), averaged over the batch."""
        with fp32_region(student_z.device):
            target = F.softmax(teacher_z @ queue.T / self.t, dim=1)
            log_student = F.log_softmax(student_z @ queue.T / self.t, dim=1)
            return F.kl_div(log_student, target, reduction="batchmean")

    def forward(self, v1, v2, mix_generator: torch.Generator | None = None):
        if mix_generator is not None:
            raise ValueError("the distillation student trains without i-CutMix")
        queue, keys, loss = self.queue.clone(), [], 0.0
        for v in (v1, v2):
            with torch.no_grad():
                teacher_z = F.normalize(self.teacher(v).float(), dim=1)
            student_z = F.normalize(self.head(self.backbone(v)).float(), dim=1)
            loss = loss + self.loss(teacher_z, student_z, queue)
            keys.append(teacher_z)
        self._enqueue(torch.cat(keys))
        return loss / 2

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        size = len(self.queue)
        keys = keys[-size:]
        ptr = int(self.queue_ptr)
        self.queue[(torch.arange(len(keys), device=keys.device) + ptr) % size] = keys
        self.queue_ptr.fill_((ptr + len(keys)) % size)


def trusted_indices(n: int, share: float, seed: int) -> np.ndarray:
    """The sorted indices of the trusted images: a seeded random ``share`` of the ``n`` training images."""
    return np.sort(np.random.default_rng(seed).choice(n, size=max(1, round(share * n)), replace=False))


def with_trusted(params: Params, share: float) -> Params:
    return dataclasses.replace(params, kd=dataclasses.replace(params.kd, trusted=share))


def kd_stage(params: Params, progress: bool = True) -> Path:
    """The cached ``kd_student`` stage: the backdoored model (``ssl_poisoned``, the profile's method, no
    i-CutMix) distilled into a fresh student on ``kd.trusted`` of the clean training images. Writes
    ``backbone.safetensors`` (the student), ``trusted.npy`` and the history. Resumable."""
    params = dataclasses.replace(params, ssl=dataclasses.replace(params.ssl, icutmix=False))
    teacher_dir = train_stage(params, "poisoned", progress=progress)
    k, c = params.kd, params.compute

    def compute(out: Path, final: Path, work: Path) -> None:
        if c.threads:
            torch.set_num_threads(c.threads)
        data = load_data(params, progress=progress)
        clean = data.train.tensor()
        trusted = trusted_indices(len(clean), k.trusted, k.seed)
        batch = min(k.batch_size, len(trusted))  # a trusted set smaller than a batch is one batch
        p = dataclasses.replace(params.ssl, epochs=k.epochs, batch_size=batch, seed=k.seed)
        size = clean.shape[-1]
        teacher = load_backbone(params, teacher_dir, size)
        torch.manual_seed(k.seed)  # the student's initial weights
        model = Distiller(teacher, backbone_for(params.ssl, size), k.queue_size, k.temperature)
        desc = f"KD student ({k.trusted:.0%} trusted)"
        pixels = clean[torch.as_tensor(trusted)]
        _, history = train_ssl(pixels, p, work, progress, precision=c.ssl_precision, model=model, desc=desc)
        write_model(out, model.backbone, history, c.ssl_precision)
        np.save(out / "trusted.npy", trusted)

    return resumable_stage("kd_student", params, compute).path
