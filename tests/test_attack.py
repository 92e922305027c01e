import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import attack, data, paths
from helpers.attack import AttackError


def replace(p, **changes):
    return dataclasses.replace(p, attack=dataclasses.replace(p.attack, **changes))


def plant(p):
    d = data.load_data(p, progress=False)
    return d, attack.run_attack(p, d, progress=False)


def test_poison_counts_and_rate(tiny_params):
    d, a = plant(tiny_params)  # target dog: 10 images, rate 0.5
    assert len(a.poison_idx) == 5 and a.counts["poisoned_images"] == 5
    assert (d.train.labels[a.poison_idx] == d.train.classes.index("dog")).all()
    assert len(np.unique(a.poison_idx)) == 5 and a.poison_mask(len(d.train.images)).sum() == 5
    assert a.counts["poisoned_fraction_of_target"] == 0.5 and a.counts["poisoned_fraction_of_train"] == 5 / 24
    _, full = plant(replace(tiny_params, poison_rate=1.0))
    assert len(full.poison_idx) == 10
    _, odd = plant(replace(tiny_params, poison_rate=0.33))
    assert len(odd.poison_idx) == round(0.33 * 10)


def test_trigger_size_and_margins(tiny_params):
    d, a = plant(tiny_params)  # 20 px images, trigger 0.25 -> 5 px
    assert a.counts["trigger_side_px"] == 5
    x, y, w, h = a.poison_boxes.reshape(-1, 4).T
    assert (w == 5).all() and (h == 5).all()
    assert x.min() >= 5 and y.min() >= 5 and x.max() <= 15 - 5 and y.max() <= 15 - 5  # [0.25 W, 0.75 W - w]
    vx, vy = a.val_boxes.reshape(-1, 4).T[:2]
    assert vx.min() >= 2 and vy.min() >= 2 and vx.max() <= 18 - 5 and vy.max() <= 18 - 5  # [0.10 W, 0.90 W - w]


def test_trigger_pixels_are_pasted_exactly_and_nothing_else_changes(tiny_params):
    d, a = plant(tiny_params)
    poisoned = attack.poisoned_train_pixels(d, a)
    clean = d.train.tensor()
    trigger = a.trigger.at(5)
    changed = (poisoned != clean).any(dim=1)
    for i, (x, y, w, h) in zip(a.poison_idx, a.poison_boxes[:, 0], strict=True):
        assert torch.equal(poisoned[i, :, y : y + h, x : x + w], trigger)
        outside = changed[i].clone()
        outside[y : y + h, x : x + w] = False
        assert not outside.any()
    untouched = np.setdiff1d(np.arange(len(clean)), a.poison_idx)
    assert torch.equal(poisoned[untouched], clean[untouched])


def test_file_lists_hold_the_same_pixels_as_the_recipe(tiny_params):
    d, a = plant(tiny_params)
    assert len(a.train_poisoned) == len(d.train.images)
    from_files = data.decode_images(a.train_poisoned.paths, progress=False)
    assert np.array_equal(from_files, attack.poisoned_train_pixels(d, a).numpy())
    assert np.array_equal(a.train_poisoned.labels, d.train.labels)
    # unpoisoned entries point at the original files
    clean_idx = np.setdiff1d(np.arange(len(d.train.images)), a.poison_idx)
    assert [a.train_poisoned.paths[i] for i in clean_idx] == [d.train.images.paths[i] for i in clean_idx]
    patched_files = data.decode_images(a.val_patched.paths, progress=False)
    assert np.array_equal(patched_files, attack.patched_val_pixels(d, a).numpy())


def test_patched_validation_is_every_non_target_image(tiny_params):
    d, a = plant(tiny_params)
    target = d.val.classes.index("dog")
    assert np.array_equal(a.val_idx, np.flatnonzero(d.val.labels != target))
    assert (a.val_patched.labels != target).all() and len(a.val_patched) == 6


def test_same_seed_same_attack_other_seed_other_attack(tiny_params, tmp_path, monkeypatch):
    d, a = plant(tiny_params)
    monkeypatch.setenv("PATCHSEARCH_ARTIFACTS", str(tmp_path / "elsewhere"))  # recompute from scratch
    d2, a2 = plant(tiny_params)
    assert a2.path != a.path
    assert np.array_equal(a.poison_idx, a2.poison_idx) and np.array_equal(a.poison_boxes, a2.poison_boxes)
    assert np.array_equal(a.val_boxes, a2.val_boxes)
    assert torch.equal(attack.poisoned_train_pixels(d, a), attack.poisoned_train_pixels(d2, a2))
    _, a3 = plant(replace(tiny_params, seed=4))
    assert not np.array_equal(a.poison_boxes, a3.poison_boxes)


def test_trigger_is_seeded_and_scales():
    params = replace_default(trigger_seed=10)
    t1, t2 = attack.make_trigger(params), attack.make_trigger(params)
    assert torch.equal(t1.at(7), t2.at(7)) and t1.at(7).shape == (3, 7, 7) and t1.at(7).dtype == torch.uint8
    assert not torch.equal(t1.at(7), attack.make_trigger(replace_default(trigger_seed=11)).at(7))
    assert torch.equal(t1.at(4), t1.source)  # the 4x4 grid itself at its own size


def replace_default(**changes):
    from helpers.params import AttackParams

    return dataclasses.replace(AttackParams(), **changes)


def test_user_png_trigger(tiny_params, tmp_path):
    png = tmp_path / "trigger.png"
    Image.fromarray(np.full((6, 6, 3), (255, 0, 0), dtype=np.uint8)).save(png)
    d, a = plant(replace(tiny_params, trigger=str(png)))
    x, y, w, h = a.poison_boxes[0, 0]
    pixel = attack.poisoned_train_pixels(d, a)[a.poison_idx[0], :, y, x]
    assert pixel.tolist() == [255, 0, 0]
    with pytest.raises(AttackError, match="attack.trigger: trigger image not found: .*missing.png"):
        attack.make_trigger(replace_default(trigger=str(tmp_path / "missing.png")))


def test_repeated_patches(tiny_params):
    d, a = plant(replace(tiny_params, n_copies=5))
    assert a.poison_boxes.shape == (5, 5, 4) and a.val_boxes.shape[1] == 1
    poisoned = attack.poisoned_train_pixels(d, a)
    for i, boxes in zip(a.poison_idx, a.poison_boxes, strict=True):
        last = boxes[-1]  # the last copy is on top of any overlap
        assert torch.equal(poisoned[i, :, last[1] : last[1] + 5, last[0] : last[0] + 5], a.trigger.at(5))
    assert len(np.unique(a.poison_boxes[:, :, :2].reshape(-1, 2), axis=0)) > 5  # the copies move


def test_trigger_too_large_for_the_margin_names_the_keys(tiny_params):
    d = data.load_data(tiny_params, progress=False)
    with pytest.raises(AttackError, match=r"attack.trigger_size = 0.6 .*attack.train_margin = 0.25"):
        attack.run_attack(replace(tiny_params, trigger_size=0.6), d, progress=False)
    assert not list((paths.artifacts_dir() / "attack").glob("*"))  # nothing half-written


def test_unknown_target_class_and_zero_poisons(tiny_params):
    d = data.load_data(tiny_params, progress=False)
    with pytest.raises(paths.DataError, match="class 'zebra' not in the data set"):
        attack.run_attack(replace(tiny_params, target_class="zebra"), d, progress=False)
    with pytest.raises(AttackError, match="attack.poison_rate = 0.01 .* poisons none"):
        attack.run_attack(replace(tiny_params, poison_rate=0.01), d, progress=False)


def test_original_sizes_with_resized_cache(tmp_path):
    """ImageNet-style data: training images of several sizes, absolute trigger size, resized cache."""
    from helpers import params
    from tests.conftest import make_image_folder

    root = tmp_path / "mixed"
    make_image_folder(root / "train", classes=("a", "b"), per_class=(4, 4), size=(40, 30), seed=1)
    make_image_folder(root / "train_big", classes=("a", "b"), per_class=(4, 4), size=(56, 48), seed=2)
    for name in ("a", "b"):
        for f in (root / "train_big" / name).iterdir():
            f.rename(root / "train" / name / f"big_{f.name}")
    make_image_folder(root / "val", classes=("a", "b"), per_class=(3, 3), size=(50, 44), seed=3)
    p = params.with_resolved_root(
        params.from_dict(
            {
                "profile": "mixed",
                "data": {"root": str(root), "val_split": "val", "image_size": 24},
                "attack": {"target_class": "b", "poison_rate": 1.0, "trigger_px": 6},
            },
            "mixed",
        )
    )
    d, a = plant(p)
    assert d.train.pixels.shape == (16, 3, 24, 24) and len(a.poison_idx) == 8
    sizes = {tuple(np.asarray(Image.open(a.train_poisoned.paths[i])).shape[:2]) for i in a.poison_idx}
    assert sizes == {(30, 40), (48, 56)}  # poisons keep their original sizes
    assert (a.poison_boxes[..., 2] == 6).all() and (a.val_boxes[..., 2] == 6).all()
    pixels = attack.poisoned_train_pixels(d, a, image_size=24)
    files = data.decode_images([a.train_poisoned.paths[i] for i in a.poison_idx], 24, progress=False)
    assert np.array_equal(pixels[a.poison_idx].numpy(), files)


def test_boxes_of_gives_each_image_its_trigger_box_or_zeros(tiny_params):
    d, a = plant(tiny_params)
    clean = np.flatnonzero(~a.poison_mask(len(d.train.images)))[:3]
    order = np.r_[a.poison_idx[::-1], clean]
    boxes = a.boxes_of(order)
    assert np.array_equal(boxes[: len(a.poison_idx)], a.poison_boxes[::-1])
    assert not boxes[len(a.poison_idx) :].any()


def test_a_relative_trigger_path_is_read_from_the_repository_root(tmp_path, monkeypatch):
    """The cache keys a trigger PNG by the file under the repository root; the attack must read that file,
    whatever the working directory (the notebooks run in notebooks/)."""
    from PIL import Image

    repo = tmp_path / "repo"
    (repo / "triggers").mkdir(parents=True)
    Image.fromarray(np.full((4, 4, 3), 200, dtype=np.uint8)).save(repo / "triggers" / "t.png")
    monkeypatch.setattr(paths, "REPO_ROOT", repo)
    monkeypatch.chdir(tmp_path)  # a working directory where triggers/t.png does not exist
    trigger = attack.make_trigger(replace_default(trigger="triggers/t.png"))
    assert trigger.source.shape == (3, 4, 4) and int(trigger.source.min()) == 200
