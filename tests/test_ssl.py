import pytest
import torch

from helpers import ssl
from helpers.models import build_backbone


def test_cutmix_box_and_lambda():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        (y1, y2, x1, x2), lam = ssl.cutmix_box(32, 24, g)
        assert 0 <= y1 <= y2 <= 32 and 0 <= x1 <= x2 <= 24
        assert lam == pytest.approx(1 - (y2 - y1) * (x2 - x1) / (32 * 24))  # from the clipped box
        assert 0.5 <= lam <= 1.0  # lambda = max(lambda, 1 - lambda), then the box can only shrink


def test_icutmix_pastes_the_partners_box_for_the_whole_batch():
    x = torch.arange(6, dtype=torch.float32)[:, None, None, None].expand(6, 3, 16, 16).clone()
    mixed, perm, lam = ssl.icutmix(x, torch.Generator().manual_seed(3))
    assert sorted(perm.tolist()) == list(range(6))
    for i in range(6):
        from_partner = mixed[i, 0] == perm[i].float()
        if perm[i] == i:
            continue
        ys, xs = from_partner.nonzero(as_tuple=True)
        box_area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert from_partner.sum() == box_area  # one rectangle
        assert 1 - from_partner.float().mean() == pytest.approx(lam)  # lambda is the own image's share
    boxes = {tuple((mixed[i, 0] != i).nonzero().min(0).values.tolist()) for i in range(6) if perm[i] != i}
    assert len(boxes) == 1  # one box for the whole batch


CASES = [
    ("mocov2", False),
    ("mocov2", True),
    ("byol", False),
    ("byol", True),
    ("simclr", False),
    ("mocov3", False),
    ("mocov3", True),
]


@pytest.mark.parametrize("method, mix", CASES)
def test_methods_give_a_finite_loss_and_gradients(method, mix):
    torch.manual_seed(0)
    arch = "vit" if method == "mocov3" else "resnet10"
    backbone = build_backbone(arch, 16, width=8, vit_patch=4, vit_dim=32, vit_depth=2, vit_heads=2)
    kw = {"dim": 16, "hidden": 32}
    if method == "mocov2":
        kw["queue_size"] = 64
    model = ssl.build_method(method, backbone, **kw)
    v1, v2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    loss = model(v1, v2, mix_generator=torch.Generator().manual_seed(0) if mix else None)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_moco_queue_and_momentum_update():
    torch.manual_seed(0)
    model = ssl.MoCoV2(build_backbone("resnet10", 16, width=8), dim=8, hidden=16, queue_size=40, m=0.9)
    before = model.queue.clone()
    model(torch.randn(12, 3, 16, 16), torch.randn(12, 3, 16, 16))
    assert int(model.queue_ptr) == 24  # symmetric: two batches of keys
    assert not torch.equal(model.queue[:24], before[:24]) and torch.equal(model.queue[24:], before[24:])
    online = next(model.online.parameters())
    target = next(model.target.parameters())
    with torch.no_grad():
        online.add_(1.0)
    old_target = target.clone()
    model.momentum_update()
    assert torch.allclose(target, 0.9 * old_target + 0.1 * online)


def test_byol_momentum_schedule_goes_to_one():
    model = ssl.BYOL(build_backbone("resnet10", 16, width=8), dim=8, hidden=16, m=0.99)
    model.set_progress(0.0)
    assert model.m == pytest.approx(0.99)
    model.set_progress(1.0)
    assert model.m == pytest.approx(1.0)


def test_simclr_refuses_icutmix():
    model = ssl.SimCLR(build_backbone("resnet10", 16, width=8), dim=8, hidden=16)
    with pytest.raises(ValueError, match="icutmix"):
        model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), mix_generator=torch.Generator())
