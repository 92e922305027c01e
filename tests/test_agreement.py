import numpy as np
import pytest

from helpers.studies.agreement import agreement, shift_ncc


def test_shift_ncc_finds_one_image_under_two_offsets():
    rng = np.random.default_rng(0)
    image = rng.random((12, 12, 3))
    a, b = image[0:10, 0:10], image[2:12, 1:11]  # the same content two and one pixels apart
    assert shift_ncc(a, a) == pytest.approx(1.0)
    assert shift_ncc(a, b) == pytest.approx(1.0)
    assert shift_ncc(a, rng.random((10, 10, 3))) < 0.5
    assert shift_ncc(np.ones((4, 4, 3)), a[:4, :4]) == -1.0  # nothing varies: nothing to correlate


def test_one_pasted_patch_agrees_and_image_parts_do_not():
    rng = np.random.default_rng(1)
    trigger = rng.random((8, 8, 3))
    pasted = []
    for _ in range(6):  # windows of 10 px, each around the trigger at another offset, on another background
        window = rng.random((10, 10, 3))
        y, x = rng.integers(0, 3, 2)
        window[y : y + 8, x : x + 8] = trigger
        pasted.append(window)
    parts = [rng.random((10, 10, 3)) for _ in range(6)]
    assert agreement(pasted) > 0.5 > agreement(parts)
