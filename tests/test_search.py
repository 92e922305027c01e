"""Flip test, iterative search and its pruning arithmetic, on cases whose answers are known by construction."""

import numpy as np
import pytest
import torch

from helpers import search
from helpers.cluster import flip_set
from helpers.localize import ClusterClassifier, best_windows, cut_patches
from helpers.models import Normaliser, ResNet
from helpers.search import (
    choose_window,
    destination_agreement,
    flip_destinations,
    flip_test,
    flip_test_loop,
    iterative_search,
    paste_locations,
    pick_window,
    pooled_agreement,
    prune_count,
    random_windows,
    relative_std,
    shared_locations,
    top_k_accuracy,
    window_statistic,
)


class GreenPatchNet(torch.nn.Module):
    """feature = (1 + max blue, 10 x share of pure green pixels): a green w x w patch on a 16 x 16 image
    moves it to cluster 1 exactly when 10 w^2 / 256 > 1 + its blue level."""

    def forward(self, x):
        green = ((x[:, 1] > 0.9) & (x[:, 0] < 0.1) & (x[:, 2] < 0.1)).float().mean((1, 2))
        return torch.stack([1 + x[:, 2].amax((1, 2)), 10 * green], 1)


def _toy():
    blue = torch.tensor([0.1, 0.2, 0.3, 0.5, 0.7, 0.9])  # a 6 px patch (10 * 36 / 256 = 1.41) flips the first 3
    flips = torch.zeros(6, 3, 16, 16, dtype=torch.uint8)
    flips[:, 2] = (blue * 255).round().to(torch.uint8)[:, None, None]
    model = ClusterClassifier(GreenPatchNet(), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    return model, Normaliser((0, 0, 0), (1, 1, 1)), flips


def test_poison_score_counts_the_known_flips():
    model, norm, flips = _toy()
    before = model(norm(flips)).argmax(1)
    assert torch.all(before == 0)
    green = torch.zeros(3, 3, 6, 6, dtype=torch.uint8)
    green[:, 1] = 255
    green[2] = 0  # a black patch flips nothing
    clusters = torch.tensor([1, 0, 1])
    loc = paste_locations([0, 1, 2], 6, 16, 16, 6, seed=0)
    # PatchSearch counts flips into the candidate's cluster: the green patch of a cluster-1 image moves 3
    # images into 1; the same patch from a cluster-0 image moves none into 0 (never negative); black: none
    for loop in (False, True):
        run = flip_test_loop if loop else lambda *a, **k: flip_test(*a, batch_size=5, **k)
        assert run(model, norm, flips, before, green, clusters, loc).tolist() == [3, 0, 0]
        # PoisonCAM counts every changed assignment: 3 for a green patch whatever its image's cluster
        assert run(model, norm, flips, before, green, clusters, loc, rule="changed").tolist() == [3, 3, 0]
    with pytest.raises(ValueError, match="poison score rule"):
        flip_test(model, norm, flips, before, green, clusters, loc, rule="minus")
    # a flat patch's control is itself: with the occlusion control the uniform green patch scores nothing
    assert flip_test(model, norm, flips, before, green, clusters, loc, rule="into_vs_flat").tolist() == [0, 0, 0]


class ChannelMeanNet(torch.nn.Module):
    """feature = the image's mean colour: with the three colour axes as centres, an image's cluster is its
    dominant channel, and a uniform patch moves it by a computable amount wherever it is pasted."""

    def forward(self, x):
        return x.mean((2, 3))


def test_poisoncam_score_counts_changes_in_any_direction():
    # uniform 16x16 images (R, G, B); an 8x8 patch covers a quarter of them
    colours = {"A": (150, 100, 0), "B": (200, 50, 0), "C": (100, 150, 0), "D": (0, 150, 100), "E": (100, 0, 150)}
    colours["F"] = (120, 0, 110)
    flips = torch.tensor(list(colours.values()), dtype=torch.uint8)[:, :, None, None].repeat(1, 1, 16, 16)
    model = ClusterClassifier(ChannelMeanNet(), torch.eye(3))
    norm = Normaliser((0, 0, 0), (1, 1, 1))
    before = model(norm(flips)).argmax(1)
    assert before.tolist() == [0, 0, 1, 1, 2, 0]
    patches = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    patches[0, 1] = 255  # green: A 0 -> 1 (a quarter of 255 green beats 3/4 of 150 red), nothing else
    patches[1, 2] = 255  # blue: D 1 -> 2 and F 0 -> 2, two changes from two clusters into one
    patches[2, 1:] = 255  # cyan: A 0 -> 1 and F 0 -> 2, two changes in two directions
    clusters = torch.tensor([2, 2, 1])  # the clusters of the images the candidates were cut from
    loc = paste_locations([0, 1, 2], len(flips), 16, 16, 8, seed=0)
    changed = flip_test(model, norm, flips, before, patches, clusters, loc, rule="changed")
    assert changed.tolist() == [1, 2, 2]
    assert flip_test_loop(model, norm, flips, before, patches, clusters, loc, rule="changed").tolist() == [1, 2, 2]
    # flips *into* the candidate's cluster: green from a cluster-2 image moves nothing into 2; blue from one
    # moves both into 2; cyan from a cluster-1 image moves one of its two into 1
    assert flip_test(model, norm, flips, before, patches, clusters, loc, rule="into").tolist() == [0, 2, 1]


class ColourPatternNet(torch.nn.Module):
    """feature = (mean R, mean G, mean B, 2.6 x mean horizontal contrast): with the four axes as centres an
    image's cluster is its dominant colour, unless it holds enough fine pattern (cluster 3)."""

    def forward(self, x):
        pattern = 2.6 * (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean((1, 2, 3))
        return torch.cat([x.mean((2, 3)), pattern[:, None]], 1)


def test_the_occlusion_control_ranks_the_trigger_above_blank_squares():
    # flat 16 x 16 images, most of them near a boundary between two colour clusters, as the flip images of
    # a 32 px clustering are (a quarter of the image covered by anything moves them)
    colours = [(0.6, 0.5, 0), (0.55, 0.5, 0.1), (0.58, 0.52, 0), (1, 0, 0), (0, 0.2, 1), (0.1, 0.55, 0.5)]
    colours += [(0.45, 0.62, 0), (0.8, 0.75, 0), (0.85, 0, 0.8), (0.9, 0.85, 0)]
    flips = (torch.tensor(colours) * 255).round().to(torch.uint8)[:, :, None, None].repeat(1, 1, 16, 16)
    model, norm = ClusterClassifier(ColourPatternNet(), torch.eye(4)), Normaliser((0, 0, 0), (1, 1, 1))
    before = model(norm(flips)).argmax(1)
    assert before.tolist() == [0, 0, 0, 0, 2, 1, 1, 0, 0, 0]
    patches = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    patches[0, 1], patches[0, 2] = 255, 120  # a blank teal square cut from a red image (cluster 0)
    patches[1, 1] = 255  # a blank green square cut from a green image (cluster 1)
    patches[2] = ((torch.arange(8)[:, None] + torch.arange(8)[None]) % 2 * 255).to(torch.uint8)  # the trigger
    clusters = torch.tensor([0, 1, 3])
    loc = paste_locations([0, 1, 2], len(flips), 16, 16, 8, seed=0)
    scores = {}
    for rule in search.SCORE_RULES:
        scores[rule] = flip_test(model, norm, flips, before, patches, clusters, loc, rule=rule).tolist()
        assert flip_test_loop(model, norm, flips, before, patches, clusters, loc, rule=rule).tolist() == scores[rule]
    # PoisonCAM's literal count: the teal square changes 6 assignments (to green and to blue), the trigger 5
    assert scores["changed"] == [6, 5, 5]
    # "into": the green square moves 5 images into its own cluster, as many as the trigger moves into its
    assert scores["into"] == [0, 5, 5]
    # with the control, a flat square's moves are its own flat square's: only the trigger's pattern counts
    assert scores["into_vs_flat"] == scores["changed_vs_flat"] == [0, 0, 5]
    # orthogonal centres: no cluster is nearer a candidate's than another, so "toward" is "into"
    assert scores["toward_vs_flat"] == scores["into_vs_flat"]


def test_toward_counts_the_pull_into_the_clusters_near_the_candidates_and_not_a_blank_squares():
    # two pattern clusters near each other (3 and 4: one target's poisons split in two by k-means); a
    # checkerboard trigger cut from a cluster-3 image moves reddish images into 3 and greenish ones into 4
    centres = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0.3, 0, 0, 1], [0, 0.3, 0, 1]])
    model, norm = ClusterClassifier(ColourPatternNet(), centres), Normaliser((0, 0, 0), (1, 1, 1))
    colours = [(0.6, 0, 0), (0.5, 0.1, 0), (0, 0.6, 0), (0.1, 0.5, 0), (0, 0, 0.7), (0.3, 0.3, 0.3), (0.2, 0.5, 0.1)]
    flips = (torch.tensor(colours) * 255).round().to(torch.uint8)[:, :, None, None].repeat(1, 1, 16, 16)
    before = model(norm(flips)).argmax(1)
    assert before.tolist() == [0, 0, 1, 1, 2, 0, 1]
    patches = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    patches[0] = ((torch.arange(8)[:, None] + torch.arange(8)[None]) % 2 * 255).to(torch.uint8)  # the trigger
    patches[1, 2] = 255  # a blank blue square from a cluster-2 image
    patches[2, 1] = 200  # a blank green square from a cluster-1 image
    clusters = torch.tensor([3, 2, 1])
    loc = paste_locations([0, 1, 2], len(flips), 16, 16, 8, seed=0)
    after = flip_destinations(model, norm, flips, patches, loc)
    assert after[0].tolist() == [3, 3, 4, 4, 3, 3, 4]  # every flip image pulled to the pattern clusters
    scores = {}
    for rule in search.SCORE_RULES:
        scores[rule] = flip_test(model, norm, flips, before, patches, clusters, loc, rule=rule).tolist()
        assert flip_test_loop(model, norm, flips, before, patches, clusters, loc, rule=rule).tolist() == scores[rule]
    assert scores["into"] == [4, 1, 1]  # the trigger's pull into 4 is lost; each blank square moves one image
    assert scores["toward_vs_flat"] == [7, 0, 0]  # all seven; a blank square's moves are its flat square's


def test_batched_flip_test_equals_the_loop_on_a_network():
    torch.manual_seed(0)
    backbone = ResNet((1, 1, 1, 1), width=8, stem_stride=2).eval()
    pixels = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    norm = Normaliser((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    with torch.no_grad():
        feats = backbone(norm(pixels))
    model = ClusterClassifier(backbone, feats[:4]).eval()
    flips = pixels[:12]
    before = model(norm(flips)).argmax(1)
    patches = pixels[20:30, :, 4:14, 4:14]
    clusters = torch.arange(10) % 4
    loc = paste_locations(np.arange(20, 30), len(flips), 32, 32, 10, seed=3)
    batched = flip_test(model, norm, flips, before, patches, clusters, loc, batch_size=37)
    assert batched.tolist() == flip_test_loop(model, norm, flips, before, patches, clusters, loc).tolist()
    assert np.abs(batched).sum() > 0  # the case is not trivially all zero


def test_paste_locations_depend_on_the_image_not_the_batch():
    a = paste_locations([5, 9], 4, 32, 32, 8, seed=1)
    b = paste_locations([9], 4, 32, 32, 8, seed=1)
    assert torch.equal(a[1], b[0])
    assert a.min() >= 0 and a.max() <= 24


def test_flip_set_takes_the_member_nearest_each_centre():
    feats = np.array([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8], [0.1, 1]], dtype=np.float32)
    assignment = np.array([0, 0, 1, 1, 1])
    centroids = np.array([[1, 0], [0, 1]], dtype=np.float32)
    assert flip_set(feats, assignment, centroids).tolist() == [0, 2]


def test_pruning_arithmetic():
    assert [prune_count(n, 0.25) for n in (100, 75, 8, 3, 1)] == [25, 19, 2, 1, 1]
    alive, n = [], 100
    while n:
        alive.append(n)
        n -= prune_count(n, 0.25)
    assert alive == [100, 75, 56, 42, 31, 23, 17, 12, 9, 6, 4, 3, 2, 1]


def test_iterative_search_prunes_the_least_poisonous_clusters():
    assignment = np.repeat(np.arange(8), 100)  # 8 clusters of 100; cluster c's images score c
    calls = []

    def score(idx):
        calls.append(np.unique(assignment[idx]).tolist())
        return assignment[idx].astype(float)

    result = iterative_search(assignment, score, samples_per_cluster=2, prune_fraction=0.25, seed=0)
    assert [r["clusters"] for r in result.rounds] == [8, 6, 4, 3, 2, 1]
    assert calls == [list(range(8)), list(range(2, 8)), list(range(4, 8)), [5, 6, 7], [6, 7], [7]]
    assert result.scored.sum() == 2 * (8 + 6 + 4 + 3 + 2 + 1)
    assert np.all(assignment[result.ranking()[:12]] == 7)  # cluster 7 was scored in every round: 12 images
    assert np.all(result.scores[~result.scored] == 0)


def test_exhausted_clusters_drop_out():
    assignment = np.array([0] * 2 + [1] * 10 + [2] * 10)
    result = iterative_search(assignment, lambda idx: np.array([9.0, 5.0, 1.0])[assignment[idx]], 2, 0.25)
    # round 0: cluster 2 pruned (lowest), cluster 0 has no unscored image left; round 1: cluster 1 alone
    assert [r["clusters"] for r in result.rounds] == [3, 1]
    assert result.scored.sum() == 8 and result.scored[:2].all()


def test_rsd_and_top_k():
    assert np.isclose(relative_std(np.array([1.0, 3.0])), 0.5)
    assert np.isnan(relative_std(np.array([0.0, 0.0])))
    mask = np.array([True, False, True, True])
    assert top_k_accuracy(np.array([0, 2, 1, 3]), mask, k=2) == 1.0
    assert top_k_accuracy(np.array([1, 0, 2, 3]), mask, k=2) == 0.5


def test_tie_fair_top_k_is_the_mean_over_every_order_of_the_ties():
    scores = np.array([3, 2, 2, 2, 0, 0, 5])
    scored = np.array([1, 1, 1, 1, 1, 0, 1], bool)
    poison = np.array([1, 1, 0, 0, 0, 1, 1], bool)
    # k = 3: 5 and 3 ahead (both poisons), one place among the three tied at 2 (one poison): (2 + 1/3) / 3
    assert search.tie_fair_top_k_accuracy(scores, scored, poison, 3) == pytest.approx(7 / 9)
    rng = np.random.default_rng(0)
    for k in (1, 2, 4, 5, 6, 7):  # against ranking.ranking() over many random tie orders
        draws = [
            search.top_k_accuracy(search.SearchResult(scores, scored, ids=rng.permutation(7)).ranking(), poison, k)
            for _ in range(400)
        ]
        expected = search.tie_fair_top_k_accuracy(scores, scored, poison, k)
        assert abs(np.mean(draws) - expected) < 0.04, k
    # the scored image at 0 ranks ahead of the unscored one at 0: no tie between them
    assert search.tie_fair_top_k_accuracy(scores, scored, poison, 6) == pytest.approx(3 / 6)
    assert search.tie_fair_top_k_accuracy(scores, scored, ~poison, 2) == 0.0  # no tie at the 2nd place
    ahead, tied = search.kth_place(scores, scored, 3)  # the masks the order study counts the ties with
    assert ahead.nonzero()[0].tolist() == [0, 6] and tied.nonzero()[0].tolist() == [1, 2, 3]
    ahead, tied = search.kth_place(scores, scored, 6)
    assert ahead.sum() == 5 and tied.nonzero()[0].tolist() == [4]


def test_window_rules():
    assert np.isclose(window_statistic(np.array([0, 0, 0, 4, 8.0]), "contrast", k=2), 6.0)
    assert np.isclose(window_statistic(np.array([1.0, 3.0]), "rsd"), 0.5)
    with pytest.raises(ValueError, match="window rule"):
        window_statistic(np.array([1.0]), "variance")
    w, stats = choose_window({4: np.zeros(5), 6: np.array([0, 0, 5.0]), 8: np.array([0, 0, 5.0])}, "contrast", k=1)
    assert w == 6 and np.isclose(stats[8], 5.0)  # a tie goes to the smaller side
    assert choose_window({4: np.zeros(3), 6: np.zeros(3)}, "rsd")[0] == 4  # all nan: the smallest side


def test_pooled_agreement_weighs_pairs_by_their_common_moves():
    before = torch.tensor([0, 0, 0, 0])
    # patches 0 and 1 both move images 0-2 and agree on 0 and 1; patch 2 moves image 3 only (no common move)
    after = torch.tensor([[1, 1, 2, 0], [1, 1, 3, 0], [0, 0, 0, 4]])
    assert np.isclose(pooled_agreement(after, before), 4 / 6)  # pooled over the ordered pairs
    assert np.isclose(destination_agreement(after, before), 2 * (2 / 3) / 6)  # the per-pair mean
    assert np.isnan(pooled_agreement(after[:1], before))


class PlantedTriggerNet(torch.nn.Module):
    """Two features: content ``1 + max blue`` and trigger evidence ``40 x magenta share - 4 x grey share``.
    Pasting a window cut around a planted 6x6 magenta trigger moves an image to cluster 1 when the magenta
    it carries outweighs the image's blue level and the grey background the window drags along."""

    def forward(self, x):
        magenta = ((x[:, 0] > 0.9) & (x[:, 1] < 0.1) & (x[:, 2] > 0.9)).float().mean((1, 2))
        grey = ((x - 0.5).abs() < 0.02).all(1).float().mean((1, 2))
        return torch.stack([1 + x[:, 2].amax((1, 2)), 40 * magenta - 4 * grey], 1)


def test_blind_window_picks_the_planted_trigger_size():
    """The whole scoring path (heatmap -> best window -> cut -> flip test) on a planted case: 8 poisoned
    grey images carry a 6x6 magenta trigger at random places, 32 clean grey images none. Windows smaller
    than 6 carry part of the trigger and flip fewer images; larger ones drag grey background along, which
    the model reads as evidence against the trigger. The contrast rule must pick 6 px."""
    size, side, rng = 24, 6, np.random.default_rng(0)
    pixels = torch.full((40, 3, size, size), 128, dtype=torch.uint8)
    poisons = np.arange(8)
    for i in poisons:
        x, y = rng.integers(0, size - side + 1, 2)
        pixels[i, 0, y : y + side, x : x + side] = 255
        pixels[i, 1, y : y + side, x : x + side] = 0
        pixels[i, 2, y : y + side, x : x + side] = 255
    # the localization's heatmap: the trigger lights up on a poison; noise elsewhere
    heat = torch.from_numpy(rng.random((40, size, size)) * 0.1).float()
    heat[poisons] += (pixels[poisons, 1] == 0).float()
    blues = torch.linspace(0.05, 0.95, 12)
    flips = torch.zeros(12, 3, size, size, dtype=torch.uint8)
    flips[:, 2] = (blues * 255).round().to(torch.uint8)[:, None, None]
    model = ClusterClassifier(PlantedTriggerNet(), torch.eye(2))
    norm = Normaliser((0, 0, 0), (1, 1, 1))
    before = model(norm(flips)).argmax(1)
    assert torch.all(before == 0)
    clusters = torch.tensor([1] * 8 + [0] * 32)  # the poisons form the trigger's cluster
    populations = {}
    for w in (3, 4, 6, 8, 12, 16):
        xs, ys = best_windows(heat, w)
        patches = cut_patches(pixels, xs, ys, w)
        loc = paste_locations(np.arange(40), len(flips), size, size, w, seed=0)
        populations[w] = flip_test(model, norm, flips, before, patches, clusters, loc).astype(float)
    assert populations[6][:8].min() == 12 and populations[3][:8].max() < 12  # the whole trigger flips all
    assert populations[16][:8].max() < 12  # a window of mostly background flips fewer
    assert (np.concatenate(list(populations.values())).reshape(6, 40)[:, 8:] == 0).all()  # clean: nothing
    assert choose_window(populations, "contrast", k=8)[0] == side


class ColourTriggerNet(torch.nn.Module):
    """Features: shares of pure red, green and blue pixels, 20 x the share of magenta (the trigger) and the
    share of grey. Clusters (identity centres): 0 red, 1 green, 2 blue, 3 trigger, 4 grey."""

    def forward(self, x):
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        hi, lo = 0.9, 0.1
        shares = [
            ((r > hi) & (g < lo) & (b < lo)).float().mean((1, 2)),
            ((g > hi) & (r < lo) & (b < lo)).float().mean((1, 2)),
            ((b > hi) & (r < lo) & (g < lo)).float().mean((1, 2)),
            20 * ((r > hi) & (g < lo) & (b > hi)).float().mean((1, 2)),
            ((x - 0.5).abs() < 0.02).all(1).float().mean((1, 2)),
        ]
        return torch.stack(shares, 1)


def test_agreement_rule_picks_the_planted_trigger_size():
    """The top candidates are 8 poisons (a 6x6 magenta trigger at a random place on a red, green or blue
    image) and 4 clean images of those colours; the flip images are grey. Located windows of side >= 6 carry
    the whole trigger and send every flip image to the trigger's cluster (agreement 1); smaller ones flip
    nothing. Random windows of the same images carry the trigger only when they are large, so the located
    windows' lead over them is largest at the planted side (here 8 px ties with it: random 8 px windows miss
    the trigger too, and a tie goes to the smaller side): the rule must pick 6 px."""
    size, side, rng = 24, 6, np.random.default_rng(0)
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=torch.uint8)
    pixels = colours[rng.integers(0, 3, 12)][:, :, None, None].expand(12, 3, size, size).clone()
    heat = torch.from_numpy(rng.random((12, size, size)) * 0.1).float()
    for i in range(8):
        x, y = rng.integers(0, size - side + 1, 2)
        pixels[i, :, y : y + side, x : x + side] = torch.tensor([255, 0, 255], dtype=torch.uint8)[:, None, None]
        heat[i, y : y + side, x : x + side] += 1
    flips = torch.full((16, 3, size, size), 128, dtype=torch.uint8)
    model = ClusterClassifier(ColourTriggerNet(), torch.eye(5))
    norm = Normaliser((0, 0, 0), (1, 1, 1))
    before = model(norm(flips)).argmax(1)
    assert torch.all(before == 4)
    stats, located = {}, {}
    for w in (3, 4, 6, 8, 12, 16, 20):
        places = shared_locations(12, len(flips), size, w, seed=0)
        xs, ys = best_windows(heat, w)
        after = flip_destinations(model, norm, flips, cut_patches(pixels, xs, ys, w), places)
        corners = random_windows(np.arange(12), size, w, seed=0)
        chance = flip_destinations(model, norm, flips, cut_patches(pixels, corners[:, 0], corners[:, 1], w), places)
        located[w] = destination_agreement(after, before)
        stats[w] = located[w] - destination_agreement(chance, before)
        if w >= side:
            assert (after[:8] == 3).all()  # the whole trigger sends every flip image to its cluster
    assert located[3] == located[4] == 0  # part of the trigger flips nothing
    assert np.isclose(located[6], 8 * 7 / (12 * 11))  # the 8 poisons agree pairwise, the clean 4 move nothing
    assert stats[20] < stats[6]  # random windows that large carry the trigger too
    assert pick_window(stats) == side


def test_destination_agreement_counts_common_moves():
    before = torch.tensor([0, 0, 0, 0])
    after = torch.tensor([[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0]])
    # pairs (0,1), (1,0): both moved images 0 and 1, same cluster on image 0 -> 1/2; pairs with patch 2: 0
    assert np.isclose(destination_agreement(after, before), 2 * 0.5 / 6)
    assert np.isnan(destination_agreement(after[:1], before))
    assert pick_window({4: 0.1, 6: 0.3, 8: 0.3, 10: float("nan")}) == 6
