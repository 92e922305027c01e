"""Each notebook's readable version of an algorithm (cells tagged ``readable``) gives the result of the fast
kernel in ``helpers`` on a small case."""

import copy
import math

import jupytext
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import classify, cluster, evaluate, localize, paths, search, ssl
from helpers.models import Normaliser, ResNet


def readable(stem: str) -> dict:
    """The functions defined in a notebook's ``readable`` cells, with the names its setup cell imports."""
    source = paths.NOTEBOOKS_DIR / f"{stem}.py"
    cells = [c.source for c in jupytext.read(source).cells if "readable" in c.metadata.get("tags", [])]
    assert cells, f"{source.name} has no cell tagged 'readable'"
    namespace = {"np": np, "torch": torch, "F": F, "math": math}
    for code in cells:
        exec(compile(code, f"{source.name}:readable", "exec"), namespace)
    return namespace


def tiny_classifier(seed=0, k=4):
    torch.manual_seed(seed)
    backbone = ResNet((1, 1, 1, 1), width=8, stem="cifar", stem_stride=1).eval()
    norm = Normaliser((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    pixels = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        feats = backbone(norm(pixels))
    model = localize.ClusterClassifier(backbone, feats[:k] + 0.05 * torch.randn(k, feats.shape[1]), "layer2").eval()
    return model, norm, pixels


def test_kmeans_and_the_cluster_classifier_of_notebook_03():
    nb = readable("03_clustering")
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:3] * 5
    x = np.concatenate([c + 0.3 * rng.standard_normal((30, 8)) for c in centres]).astype(np.float32)
    _, mine = nb["kmeans_readable"](x, 3, iterations=10, seed=1)
    faiss = cluster.kmeans(x, 3, seed=0).assignment
    pairs = {(int(a), int(b)) for a, b in zip(mine, faiss, strict=True)}
    assert len(pairs) == 3 and len(set(mine)) == 3  # the same partition, up to the clusters' names
    model = localize.ClusterClassifier(torch.nn.Identity(), torch.as_tensor(centres, dtype=torch.float32))
    kernel = localize.assign(model, torch.as_tensor(x)).numpy()
    assert (nb["assign_readable"](x, centres) == kernel).all()


def test_grad_cam_and_poisoncam_of_notebook_04():
    nb = readable("04_trigger_localization")
    model, norm, pixels = tiny_classifier()
    x = norm(pixels[:3])
    targets = model(x).argmax(1)
    kernel = localize.grad_cam(model, x, targets)
    for i in range(3):
        mine = nb["grad_cam_readable"](model, x[i], int(targets[i]))
        assert torch.allclose(mine, kernel[i], atol=1e-4)  # float rounding: a batch of one differs as much
    masks = localize.make_masks("full", 16, 32, 4, 0.5, seed=0)
    stats = np.array([[0.3, 0.1], [0.2, 0.05], [0.4, 0.2], [0.1, 0.1]], dtype=np.float32)
    kernel = localize.poisoncam_heatmaps(model, x, targets, masks, stats)
    for i in range(3):
        c = int(targets[i])
        mine = nb["poisoncam_readable"](model, x[i], c, masks, torch.tensor(stats[c, 0]), torch.tensor(stats[c, 1]))
        assert torch.allclose(mine, kernel[i], atol=1e-4)  # float rounding: a batch of one differs as much
    assert kernel.amax((1, 2)).min() > 0.99  # min-max scaled, not all zero


def test_flip_test_and_search_rounds_of_notebook_05():
    nb = readable("05_search")
    model, norm, pixels = tiny_classifier(seed=1)
    flips = pixels[:10]
    before = model(norm(flips)).argmax(1)
    patches = pixels[12:20, :, 6:18, 6:18]
    clusters = torch.arange(8) % 4
    loc = search.paste_locations(np.arange(12, 20), len(flips), 32, 32, 12, seed=5)
    for rule in search.SCORE_RULES:
        kernel = search.flip_test(model, norm, flips, before, patches, clusters, loc, rule=rule)
        mine = [
            nb["flip_score_readable"](model, norm, flips, before, patches[c], int(clusters[c]), loc[c], rule)
            for c in range(len(patches))
        ]
        assert mine == kernel.tolist()
        assert sum(mine) > 0  # not trivially zero
    rng = np.random.default_rng(3)
    assignment = rng.integers(0, 12, 200)
    scores = rng.integers(0, 9, 200).astype(float)
    kernel = search.iterative_search(assignment, lambda idx: scores[idx], 2, 0.25, seed=7)
    order = np.random.default_rng(7)  # the kernel's shuffle of every cluster's images
    queues = {c: list(order.permutation(np.flatnonzero(assignment == c))) for c in range(12)}
    alive = [c for c in range(12) if queues[c]]
    best, n_round = dict.fromkeys(alive, -math.inf), 0
    while alive:
        alive, new = nb["search_round_readable"](alive, queues, best, scores.__getitem__, 2, 0.25)
        assert sorted(new) == sorted(np.flatnonzero(kernel.round_of == n_round).tolist())
        n_round += 1
    assert n_round == len(kernel.rounds) > 2


def test_pasting_of_notebook_06():
    nb = readable("06_poison_classifier")
    rng = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 32, 32, generator=rng)
    patches = torch.randint(0, 256, (5, 3, 12, 12), dtype=torch.uint8, generator=rng)
    for scale in ((2 / 3, 4 / 3), (1 / 3, 4 / 3), (1.5, 3.0)):  # the last reaches past the edges
        mine, mine_labels = nb["paste_readable"](images, patches, 0.5, 12, torch.Generator().manual_seed(4), scale)
        kernel, labels = classify.paste_random_patches(
            images.clone(), patches, 0.5, 12, torch.Generator().manual_seed(4), scale
        )
        assert torch.equal(mine_labels, labels) and 0 < int(labels.sum()) < 16
        assert torch.equal(mine, kernel)


@pytest.mark.parametrize("stem", ["03_clustering", "04_trigger_localization", "05_search", "06_poison_classifier"])
def test_readable_cells_define_functions_only(stem):
    """A readable cell is the algorithm, not a computation: executing it alone defines functions and runs nothing."""
    defined = {k: v for k, v in readable(stem).items() if not k.startswith("__")}
    names = set(defined) - {"np", "torch", "F", "math"}
    assert names and all(callable(defined[k]) for k in names)


def test_moco_step_of_notebook_02():
    nb = readable("02_ssl_training")
    g = torch.Generator().manual_seed(3)
    q, k, queue = (F.normalize(torch.randn(n, 8, generator=g), dim=1) for n in (6, 6, 32))
    backbone = torch.nn.Linear(4, 4)
    backbone.feature_dim = 4
    moco = ssl.MoCoV2(backbone, dim=8, hidden=8, queue_size=32, temperature=0.2, m=0.9)
    assert torch.allclose(nb["info_nce_readable"](q, k, queue, 0.2), moco._loss(q, k, queue), atol=1e-5)
    with torch.no_grad():  # the online network moves away from the target, then the target follows it
        for p in moco.online.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    online, target = copy.deepcopy(moco.online), copy.deepcopy(moco.target)
    nb["momentum_update_readable"](target, online, 0.9)
    moco.momentum_update()
    for mine, kernel in zip(target.parameters(), moco.target.parameters(), strict=True):
        assert torch.allclose(mine, kernel, atol=1e-6)


def test_probe_gradient_and_asr_of_notebook_07():
    nb = readable("07_evaluation")
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((30, 6)).astype(np.float32), rng.integers(0, 4, 30)
    W = torch.tensor(rng.standard_normal((6, 4)).astype(np.float32), requires_grad=True)
    F.cross_entropy(torch.as_tensor(x) @ W, torch.as_tensor(y)).backward()
    assert np.allclose(nb["probe_gradient_readable"](W.detach().numpy(), x, y), W.grad.numpy(), atol=1e-6)
    preds, labels = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    kernel = evaluate.attack_metrics(preds, labels, target=2)
    assert nb["fp_asr_readable"](preds, labels, 2) == (kernel["fp"], pytest.approx(kernel["asr"]))
    assert nb["fp_asr_readable"]([2, 2, 0], [2, 1, 1], 2) == (1, 0.5)  # a target image predicted as the target: no FP


def test_icutmix_loss_of_notebook_08():
    nb = readable("08_more_defenses")
    g = torch.Generator().manual_seed(5)
    q, k, queue = (F.normalize(torch.randn(n, 8, generator=g), dim=1) for n in (6, 6, 32))
    partner = torch.randperm(6, generator=g)
    backbone = torch.nn.Linear(4, 4)
    backbone.feature_dim = 4
    moco = ssl.MoCoV2(backbone, dim=8, hidden=8, queue_size=32, temperature=0.1)
    for lam in (1.0, 0.6):
        mine = nb["icutmix_loss_readable"](q, k, queue, partner, lam, 0.1)
        assert torch.allclose(mine, moco._loss(q, k, queue, partner, lam), atol=1e-5)
