"""Notebook 08's pieces: the KD loss, the i-CutMix variants' boxes, training them in train_ssl, the coverage
replay and the trusted subset."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers.kd import Distiller, trusted_indices
from helpers.mixing import Mixer, mix_batch, mixed_model, trigger_coverage, trigger_masks
from helpers.ssl import icutmix, train_ssl
from tests.test_ssl_loop import PIXELS, tiny

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)


class Linear(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.net, self.feature_dim = nn.Linear(dim_in, dim_out), dim_out

    def forward(self, x):
        return self.net(x.flatten(1))


def test_kd_loss_is_zero_when_the_student_matches_and_positive_otherwise():
    torch.manual_seed(0)
    model = Distiller(Linear(12, 6), Linear(12, 6), queue_size=32, temperature=0.04)
    queue = F.normalize(torch.randn(32, 6), dim=1)
    z = F.normalize(torch.randn(8, 6), dim=1)
    assert float(model.loss(z, z, queue)) == pytest.approx(0.0, abs=1e-6)
    assert float(model.loss(z, F.normalize(torch.randn(8, 6), dim=1), queue)) > 0.5


def test_a_toy_student_learns_its_teachers_similarities_and_the_teacher_does_not_move():
    """A linear student distilled from a linear teacher on random inputs: the KD loss falls by most of its
    value, the student's similarity ranking over the queue comes to agree with the teacher's, and the frozen
    teacher (and its batch norm, in eval mode throughout) is unchanged."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6))
    teacher.feature_dim = 6
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = Distiller(teacher, Linear(12, 6), queue_size=64, temperature=0.1)
    model.train()
    optimizer = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=0.02)
    x = torch.randn(256, 12)
    losses = []
    for step in range(300):
        batch = x[torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(step))]
        loss = model(batch, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.25 * np.mean(losses[:5])
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        t = F.normalize(teacher(x[:50]), dim=1) @ model.queue.T
        s = F.normalize(model.head(model.backbone(x[:50])), dim=1) @ model.queue.T
    agree = (t.argmax(1) == s.argmax(1)).float().mean()
    assert agree > 0.8


def _views():
    return torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("fill", ["crop", "black", "noise"])
def test_every_fill_uses_i_cutmix_box_and_partner_and_changes_only_the_box(fill):
    x = _views()
    ref, ref_perm, ref_lam = icutmix(x, torch.Generator().manual_seed(7))
    mixed, perm, lam = mix_batch(x, fill, torch.Generator().manual_seed(7), MEAN, STD)
    assert torch.equal(perm, ref_perm) and lam == ref_lam
    inside = (ref != x).any(dim=(0, 1))  # the box: where i-CutMix changed some image
    ys, xs = torch.nonzero(inside, as_tuple=True)
    box = torch.zeros(16, 16, dtype=torch.bool)
    box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
    assert lam == pytest.approx(1 - box.sum().item() / 256)
    assert torch.equal(mixed[:, :, ~box], x[:, :, ~box])  # outside the box: untouched
    if fill == "crop":
        assert torch.equal(mixed, ref)
    elif fill == "black":  # pixel value 0 after normalisation, in every image
        black = (-torch.tensor(MEAN) / torch.tensor(STD))[None, :, None]
        assert torch.allclose(mixed[:, :, box], black.expand(6, 3, int(box.sum())))
    else:
        noise = mixed[:, :, box]
        assert abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.1
        assert not torch.allclose(noise[0], noise[1])


def test_unknown_fill_and_loss_are_refused_by_name():
    with pytest.raises(ValueError, match="mix.fill.*'gray'"):
        mix_batch(_views(), "gray", torch.Generator(), MEAN, STD)
    with pytest.raises(ValueError, match="mix.loss.*'soft'"):
        Mixer("crop", "soft", MEAN, STD)


def test_the_onehot_loss_is_the_weighted_one_with_lambda_one():
    p = tiny(method="mocov2", icutmix=True)
    v1, v2 = _views(), _views().flip(3)
    losses = {}
    for loss in ("weighted", "onehot"):
        model = mixed_model(p, 16, "crop", loss)
        losses[loss] = float(model(v1, v2, mix_generator=torch.Generator().manual_seed(5)))
    model = mixed_model(p, 16, "crop", "weighted")
    m, g = model, torch.Generator().manual_seed(5)
    negatives, total = m.queue.clone(), 0.0
    for a, b in [(v1, v2), (v2, v1)]:
        mixed, perm, _ = icutmix(a, g)
        q = m._embed(m.online, mixed)
        total += float(m._loss(q, m._embed(m.target, b), negatives, perm, 1.0))
    assert losses["onehot"] == pytest.approx(total / 2, rel=1e-5)
    assert losses["onehot"] != pytest.approx(losses["weighted"], rel=1e-3)


def test_the_crop_and_weighted_mixer_trains_i_cutmix_to_the_same_weights(tmp_path):
    """crop + weighted, built by ``mixed_model`` and handed to ``train_ssl``, is the profile's i-CutMix model,
    weight for weight: the ablation's rows differ from the i-CutMix row by their box or loss alone."""
    p = tiny(method="mocov2", icutmix=True, epochs=2)
    reference, ref_history = train_ssl(PIXELS, p, tmp_path / "train_ssl", progress=False)
    model = mixed_model(p, 16, "crop", "weighted")
    _, history = train_ssl(PIXELS, p, tmp_path / "mixed", progress=False, model=model)
    assert [h["loss"] for h in history] == [h["loss"] for h in ref_history]
    ref_state, state = reference.backbone.state_dict(), model.backbone.state_dict()
    for key in ref_state:
        assert torch.equal(ref_state[key], state[key]), key


def test_coverage_replay_on_whole_and_empty_masks():
    p = tiny(batch_size=16, crop_min_scale=0.5)
    none = trigger_masks(32, np.zeros((0, 1, 4), dtype=np.int64), np.zeros(0, dtype=np.int64), 16)
    stats = trigger_coverage(none, p, trigger_area=16, batches=3)
    assert stats["views with a trigger (%)"] == 0 and stats["views given a trigger piece by the partner (%)"] == 0
    whole = trigger_masks(32, np.tile([[[0, 0, 16, 16]]], (32, 1, 1)), np.arange(32), 16)
    stats = trigger_coverage(whole, p, trigger_area=256, batches=3)
    assert stats["views with a trigger (%)"] == 100
    assert stats["trigger hidden entirely (%)"] == 0  # a box never spans a whole view (lambda >= 0.5)
    assert 0 < stats["trigger area covered by the box (%)"] <= 50
    assert stats["views given a trigger piece by the partner (%)"] == 100


def test_trusted_indices_are_a_seeded_share_without_repeats():
    a = trusted_indices(1000, 0.05, 0)
    assert len(a) == 50 and len(set(a.tolist())) == 50 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, trusted_indices(1000, 0.05, 0)) and not np.array_equal(a, trusted_indices(1000, 0.05, 1))


def test_held_out_images_lie_outside_the_training_subset_and_the_test_split(tiny_params):
    """The held-out selection reads only training-split images the profile's subset leaves out."""
    import dataclasses

    from helpers.data import load_data
    from helpers.studies.heldout import heldout_images

    p = dataclasses.replace(tiny_params, data=dataclasses.replace(tiny_params.data, train_per_class=4))
    pixels, labels = heldout_images(p, per_class=2, seed=0)
    assert pixels.shape == (6, 3, 20, 20) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    inside = load_data(p, progress=False).train.pixels
    for image in pixels:  # random-noise images: equal pixels mean the same file
        assert not any(np.array_equal(image, other) for other in inside)
    with pytest.raises(ValueError, match="only 2 training images of frog lie outside"):
        heldout_images(p, per_class=3, seed=0)
