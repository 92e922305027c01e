"""Figure 3's potency: the flip-test score of every image's patch, each category's maximum."""

import numpy as np
import torch

from helpers.potency import category_potency
from helpers.search import flip_test, paste_locations
from tests.test_search import _toy


def test_the_planted_patch_is_its_categorys_potency_and_the_rest_score_nothing():
    """Six candidate patches from three categories of a clean set; one image of category 2 carries a green
    6x6 patch, which the toy model reads as cluster 1's evidence: it pulls exactly the three flip images
    whose blue level it outweighs (``_toy``). Category 2's potency is that score, on that image; the other
    categories' patches flip nothing, so the total potency is 3."""
    model, norm, flips = _toy()
    before = model(norm(flips)).argmax(1)
    patches = torch.zeros(6, 3, 6, 6, dtype=torch.uint8)
    patches[:, 0] = 90  # dull red patches: no evidence for either cluster
    planted = 4
    patches[planted] = 0
    patches[planted, 1] = 255  # the green patch
    labels = np.array([0, 0, 1, 1, 2, 2])
    clusters = torch.ones(6, dtype=torch.long)  # every candidate's image sits in cluster 1
    loc = paste_locations(np.arange(6), len(flips), 16, 16, 6, seed=0)
    scores = flip_test(model, norm, flips, before, patches, clusters, loc, batch_size=7).astype(float)
    assert scores.tolist() == [0, 0, 0, 0, 3, 0]
    best, where = category_potency(scores, labels, 3)
    assert best.tolist() == [0, 0, 3] and where[2] == planted and best.sum() == 3


def test_category_potency_takes_the_first_of_equal_maxima_and_skips_empty_categories():
    best, where = category_potency(np.array([2.0, 5.0, 5.0, 1.0]), np.array([0, 0, 0, 2]), 4)
    assert best.tolist() == [5, 0, 1, 0] and where.tolist() == [1, -1, 3, -1]
