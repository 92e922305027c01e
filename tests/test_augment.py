import torch
import torchvision.transforms.v2.functional as TF

from helpers import augment
from helpers.augment import AugmentConfig, BatchAugment


def images(n=6, seed=0, size=16):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_each_sample_depends_only_on_itself_and_its_own_draws():
    aug = BatchAugment(AugmentConfig(size=16, blur_p=0.5))
    a, b = images(4, seed=1), images(4, seed=2)
    mixed = torch.cat([a[:2], b[2:]])  # samples 0, 1 identical to `a`, samples 2, 3 different
    out_a = aug(a, torch.Generator().manual_seed(7))
    out_mixed = aug(mixed, torch.Generator().manual_seed(7))
    assert torch.allclose(out_a[:2], out_mixed[:2], atol=1e-6)
    assert not torch.allclose(out_a[2:], out_mixed[2:])


def test_identical_images_get_different_views():
    x = images(1).repeat(16, 1, 1, 1)
    out = BatchAugment(AugmentConfig(size=16))(x, torch.Generator().manual_seed(0))
    distinct = {tuple(v.flatten()[:50].tolist()) for v in out}
    assert len(distinct) == 16


def test_same_generator_same_views():
    x = images(8)
    aug = BatchAugment(AugmentConfig(size=16, blur_p=0.5))
    assert torch.equal(aug(x, torch.Generator().manual_seed(3)), aug(x, torch.Generator().manual_seed(3)))


def test_crops_follow_torchvision_bounds():
    crops = augment.sample_crops(4000, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    top, left, h, w = crops.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 1024
    assert area.min() >= 0.2 - 0.05 and area.max() <= 1.0  # rounding to whole pixels
    assert ((w / h) >= 3 / 4 - 0.1).all() and ((w / h) <= 4 / 3 + 0.15).all()
    assert area.std() > 0.15  # the scale is drawn, not fixed


def test_crop_and_flip_grid_equals_torchvision_resized_crop():
    x = images(3, size=20).float()
    crops = torch.tensor([[2.0, 3.0, 10.0, 12.0], [0.0, 0.0, 20.0, 20.0], [5.0, 1.0, 8.0, 6.0]])
    for flip in (False, True):
        grid = augment.crop_flip_grid(crops, torch.full((3,), flip), 20, 20, 24)
        ours = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        for i, (top, left, h, w) in enumerate(crops.int().tolist()):
            ref = TF.resized_crop(x[i], top, left, h, w, [24, 24], antialias=False)
            ref = TF.horizontal_flip(ref) if flip else ref
            assert (ours[i] - ref).abs().max() < 1e-3


def test_colour_ops_match_torchvision_per_sample():
    x = torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    factors = torch.linspace(0.6, 1.4, 8)
    hues = torch.linspace(-0.1, 0.1, 8)
    for ours, theirs, f in [
        (augment.adjust_brightness, TF.adjust_brightness, factors),
        (augment.adjust_contrast, TF.adjust_contrast, factors),
        (augment.adjust_saturation, TF.adjust_saturation, factors),
        (augment.adjust_hue, TF.adjust_hue, hues),
    ]:
        ref = torch.stack([theirs(x[i], float(f[i])) for i in range(8)])
        assert (ours(x, f) - ref).abs().max() < 1e-4, ours.__name__


def test_per_sample_blur_matches_torchvision():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 1.0, 2.0])
    ours = augment.gaussian_blur(x, sigma, 5)
    for i in range(3):
        ref = TF.gaussian_blur(x[i], [5, 5], [float(sigma[i])] * 2)
        assert (ours[i] - ref).abs().max() < 1e-5


def test_the_gpu_path_gives_the_views_of_the_cpu_path():
    """``select=True`` (every op on the whole batch, kept where drawn: no host synchronisation, the GPU's
    default) gives the views of ``select=False`` (the drawn rows alone, the CPU's) from the same draws."""
    x = torch.randint(0, 256, (64, 3, 20, 20), dtype=torch.uint8)
    config = AugmentConfig(size=16, blur_p=0.5, gray_p=0.3)
    rows = BatchAugment(config, select=False)(x, torch.Generator().manual_seed(3))
    where = BatchAugment(config, select=True)(x, torch.Generator().manual_seed(3))
    assert torch.allclose(rows, where, atol=1e-5), (rows - where).abs().max()
    assert not torch.equal(rows, BatchAugment(config, select=False)(x, torch.Generator().manual_seed(4)))
