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
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .compute import fp32_region


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
