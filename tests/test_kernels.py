import pytest
import torch

from helpers.kernels import paste_patches


def paste_reference(images, patches, xs, ys, sizes=None):
    """Per-image slicing with explicit clipping: the obvious, slow definition."""
    out = images.clone()
    _, _, height, width = images.shape
    for b in range(len(images)):
        patch = patches[b] if patches.dim() == 4 else patches
        ph, pw = patch.shape[-2:]
        if sizes is not None:
            ph, pw = int(sizes[b, 0]), int(sizes[b, 1])
        for i in range(ph):
            for j in range(pw):
                r, c = int(ys[b]) + i, int(xs[b]) + j
                if 0 <= r < height and 0 <= c < width:
                    out[b, :, r, c] = patch[:, i, j]
    return out


def test_paste_is_pixel_exact_at_location_and_size():
    images = torch.zeros(1, 3, 10, 12, dtype=torch.uint8)
    patch = torch.arange(3 * 3 * 4, dtype=torch.uint8).reshape(3, 3, 4) + 1
    out = paste_patches(images, patch, torch.tensor([5]), torch.tensor([2]))
    assert torch.equal(out[0, :, 2:5, 5:9], patch)
    out[0, :, 2:5, 5:9] = 0
    assert out.sum() == 0  # nothing outside the box changed
    assert images.sum() == 0  # the input is untouched without inplace


@pytest.mark.parametrize("x, y", [(-2, -1), (9, 7), (-3, 8), (10, -2), (100, 100), (-50, 3)])
def test_paste_clips_at_every_edge(x, y):
    images = torch.zeros(1, 1, 10, 12, dtype=torch.int32)
    patch = torch.arange(1, 1 + 4 * 5, dtype=torch.int32).reshape(1, 4, 5)
    out = paste_patches(images, patch, torch.tensor([x]), torch.tensor([y]))
    assert torch.equal(out, paste_reference(images, patch, [x], [y]))
    expected_pixels = max(0, min(y + 4, 10) - max(y, 0)) * max(0, min(x + 5, 12) - max(x, 0))
    assert int((out != 0).sum()) == expected_pixels


def test_batched_paste_matches_per_image_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8)
    patches = torch.randint(0, 256, (64, 3, 7, 9), generator=g, dtype=torch.uint8)
    xs = torch.randint(-8, 34, (64,), generator=g)
    ys = torch.randint(-8, 34, (64,), generator=g)
    assert torch.equal(paste_patches(images, patches, xs, ys), paste_reference(images, patches, xs, ys))


def test_per_sample_sizes_paste_only_the_top_left_part():
    g = torch.Generator().manual_seed(1)
    images = torch.zeros(16, 3, 20, 20)
    patches = torch.rand(16, 3, 8, 8, generator=g) + 1
    sizes = torch.randint(1, 9, (16, 2), generator=g)
    xs, ys = torch.randint(-4, 20, (16,), generator=g), torch.randint(-4, 20, (16,), generator=g)
    out = paste_patches(images, patches, xs, ys, sizes=sizes)
    assert torch.equal(out, paste_reference(images, patches, xs, ys, sizes))


def test_inplace_writes_into_the_input():
    images = torch.zeros(2, 3, 8, 8)
    out = paste_patches(images, torch.ones(3, 2, 2), torch.tensor([0, 6]), torch.tensor([0, 6]), inplace=True)
    assert out.data_ptr() == images.data_ptr() and images.sum() == 2 * 3 * 4


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="B x C x H x W"):
        paste_patches(torch.zeros(3, 8, 8), torch.zeros(3, 2, 2), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="do not fit"):
        paste_patches(torch.zeros(2, 3, 8, 8), torch.zeros(1, 3, 2, 2), torch.tensor([0, 0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="xs and ys"):
        paste_patches(torch.zeros(2, 3, 8, 8), torch.zeros(3, 2, 2), torch.tensor([0]), torch.tensor([0, 0]))
