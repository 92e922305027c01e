# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %%

# %% [markdown]
# # 04 · Trigger localization: Grad-CAM (PatchSearch) and cluster activation masking (PoisonCAM)
#
# Without labels there is no classifier to explain, so both defenses make one from the clustering: the
# normalised cluster centres are the weights of a cosine classifier, and an image's "class" is its own
# cluster. The candidate trigger of an image is the `w x w` window where its heatmap is largest.
#
# - **PatchSearch** explains the cluster logit with **Grad-CAM** at the ResNet stage `search.cam_layer`
#   (for a ViT, the last block's `norm1` tokens on their grid). The paper uses `layer4`, a 7x7 grid on its
#   large images; on a small image `layer4` is a grid of a few cells, so this profile uses an earlier stage
#   whose grid is the nearest to the paper's resolution (the setup cell prints the layer and its grid). Our
#   batched Grad-CAM equals the `pytorch-grad-cam` library's maps within `1e-4` (`tests/test_localize.py`).
# - **PoisonCAM** masks the image B times (B = `search.masks` random masks with *full coverage*: every pixel hidden
#   by exactly half of them) and measures how far each masked copy falls from its cluster (a z-score of the
#   cosine distance among the cluster's members: the *clustering outlier score*). A pixel's heat is the
#   mean score of the masks that hide it minus that of the masks that keep it: hiding a trigger throws a
#   poisoned image out of the trigger's cluster. The paper publishes no code; every choice it leaves open
#   is listed in `helpers/localize.py`.
#
# The true trigger boxes are drawn for teaching; the defenses never see them. The model is notebook 03's:
# the profile's first SSL training, whose probe ASR notebook 02 and notebook 07 hold against the project's
# rule for a backdoor.

# %% [markdown]
# ## In equations
# **Grad-CAM** ([PatchSearch](https://arxiv.org/abs/2304.01482) Sec. 3). For the logit $y_c(x) = \hat\mu_c \cdot z(x)$ of the image's own cluster $c$ and
# the activations $A^{k}$ of channel $k$ at the layer `search.cam_layer` ($H' \times W'$ cells),
#
# $$\alpha_k = \frac{1}{H' W'} \sum_{i,j} \frac{\partial y_c}{\partial A^{k}_{ij}}, \qquad
# L = \mathrm{ReLU}\Big(\sum_k \alpha_k A^{k}\Big),$$
#
# upsampled to the image and scaled to $[0, 1]$.
# **Cluster activation masking** ([PoisonCAM](https://arxiv.org/abs/2312.07955) Sec. 5). Masks $M_1, \dots, M_B$ hide parts of the image; the outlier
# score of a masked copy is its distance from its cluster's centre as a z-score among the cluster's members,
#
# $$s_b = \frac{d_b - \bar d_c}{\sigma_c}, \qquad d_b = 1 - \hat\mu_c \cdot z(x \odot M_b),$$
#
# and the heat of a pixel $\mathbf{p}$ is the mean score of the masks that hide it minus the mean score of
# those that keep it, $H(\mathbf{p}) = \overline{s}_{b: M_b(\mathbf{p}) = 0} - \overline{s}_{b: M_b(\mathbf{p}) = 1}$
# (weighted by how much each soft mask hides or keeps). For both, the candidate trigger is the $w \times w$
# window with the most heat, $\arg\max_{(u,v)} \sum_{(i,j) \in W_{uv}} L_{ij}$.

# %% tags=["parameters"]
params_path = "params/cifar10.yaml"

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from helpers import attack, data, localize, notebook, plotting, search

P = notebook.setup(params_path)
NB = "04_trigger_localization"
notebook.show_markdown(notebook.opening(P, NB))  # where it sits, what it costs
D = data.load_data(P)
A = attack.run_attack(P, D)
ctx = search.defense_context(P, "poisoned")  # the stages: the model, its clustering, the training set
poison = A.poison_mask(len(ctx.pixels))
side = int(A.poison_boxes[0, 0, 2])
print(f"trigger side: {side} px on {ctx.size} px images (unknown to the defender)")
print(f"Grad-CAM layer: {P.search.cam_layer}; PoisonCAM masks: {P.search.mask_grid} x {P.search.mask_grid} cells")

# %% [markdown]
# ## Heatmaps of both methods
# A seeded sample of poisoned images, and as many clean ones. The figure shows six of each, the clean ones
# from six different classes. PoisonCAM's maps are blocky by construction: its masks hide whole cells of a
# `search.mask_grid` x `search.mask_grid` grid (cells of a few pixels here), so every pixel of a cell gets the same
# heat. Grad-CAM's map comes from an 8x8 feature grid, upsampled smoothly.

# %%
rng = np.random.default_rng(0)
n = min(P.figures.localization_sample, int(poison.sum()))
sample_p = np.sort(rng.choice(np.flatnonzero(poison), n, replace=False))
sample_c = np.sort(rng.choice(np.flatnonzero(~poison), n, replace=False))
boxes = A.boxes_of(sample_p)[:, :, :3]  # images x copies x (x, y, side)
ctx.model.precision = notebook.live_precision(P)  # this notebook's own passes, never cached
maps, seconds = {}, {}
for method in ("patchsearch", "poisoncam"):
    start = time.perf_counter()
    maps[method] = {
        "poisoned": search.heatmaps(ctx, method, sample_p, progress=True),
        "clean": search.heatmaps(ctx, method, sample_c, progress=True),
    }
    seconds[method] = time.perf_counter() - start
    print(f"{method}: {2 * n} heatmaps in {seconds[method]:.1f} s ({2 * n / seconds[method]:.0f} images/s)")


# %% tags=["hide-input"]
def overlay(ax, image, heat, box=None, window=None):
    ax.imshow(image.transpose(1, 2, 0), interpolation="nearest")
    shown = None
    if heat is not None:
        shown = ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
    for b, color in ((box, "lime"), (window, "white")):
        if b is not None:
            ax.add_patch(plt.Rectangle((b[0] - 0.5, b[1] - 0.5), b[2], b[2], fill=False, edgecolor=color, lw=1.3))
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


w_show = side  # for the picture only: the search picks w without knowing the trigger (notebook 05)
n_show = 4  # four poisoned and four clean columns fit the page
labels = D.train.labels
shown_c, seen = [], set()  # clean examples from different classes, in the sample's seeded order
for i, idx in enumerate(sample_c):
    if labels[idx] not in seen:
        shown_c.append(i)
        seen.add(labels[idx])
    if len(shown_c) == n_show:
        break
columns = [("poisoned", i) for i in range(n_show)] + [("clean", i) for i in shown_c]
fig, axes = plt.subplots(3, len(columns), figsize=(1.45 * len(columns) + 1.2, 5.4))
for j, (kind, i) in enumerate(columns):
    idx = (sample_p if kind == "poisoned" else sample_c)[i]
    image = ctx.pixels[idx].numpy()
    box = boxes[i, 0] if kind == "poisoned" else None
    overlay(axes[0, j], image, None, box)
    axes[0, j].set_title(f"{kind}\n{D.train.classes[labels[idx]]}", fontsize=8)
    for row, method in ((1, "patchsearch"), (2, "poisoncam")):
        heat = maps[method][kind][i]
        xs, ys = localize.best_windows(heat[None], w_show)
        shown = overlay(axes[row, j], image, heat.numpy(), box, (int(xs[0]), int(ys[0]), w_show))
for row, label in enumerate(["image", "PatchSearch\nGrad-CAM", "PoisonCAM\nmasking"]):
    axes[row, 0].set_ylabel(label, fontsize=9)
fig.colorbar(shown, ax=axes[1:].ravel().tolist(), fraction=0.02, pad=0.01, label="heat (0-1, per image)")
fig.suptitle(f"true trigger: green (poisoned columns); candidate window, w = {w_show} px: white", fontsize=9)
plotting.savefig(fig, P.profile, NB, "heatmaps", dpi=P.figures.dpi)

# %% [markdown]
# ## Both heatmaps, written out for one image
# The stage computes heatmaps for many images at once; here is each method for one image, in plain
# code. Grad-CAM: the gradient of the cluster's logit with respect to the activations of the CAM layer
# says how much each channel matters (its mean gradient); the weighted sum of the channels, kept where
# positive and upsampled to the image, is the map. PoisonCAM: hide parts of the image with each mask,
# measure how far the masked copy's embedding falls from its cluster's centre (a z-score against the
# distances of the cluster's own members), and give each pixel the mean score of the masks that hide it
# minus the mean score of the masks that keep it.


# %% tags=["readable"]
def min_max(m):
    m = m - m.min()
    return m / (1e-7 + m.max())


def grad_cam_readable(model, image, cluster):
    """Grad-CAM heatmap (H x W, in [0, 1]) of one normalised image (3 x H x W) for one cluster."""
    store = {}
    hook = model.cam_layer.register_forward_hook(lambda module, inputs, output: store.update(act=output))
    with torch.enable_grad():
        logit = model(image[None])[0, cluster]  # the cosine to the cluster's centre
        (grad,) = torch.autograd.grad(logit, store["act"])
    hook.remove()
    act, grad = store["act"][0].detach().float(), grad[0].float()  # channels x h x w
    weights = grad.mean(dim=(1, 2))  # one weight per channel
    cam = min_max(torch.relu((weights[:, None, None] * act).sum(0)))  # h x w
    cam = F.interpolate(cam[None, None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    return min_max(torch.relu(cam))


@torch.no_grad()
def poisoncam_readable(model, image, cluster, masks, mean_distance, std_distance):
    """PoisonCAM heatmap (H x W, in [0, 1]) of one normalised image; ``masks``: B x 1 x H x W, 1 keeps a
    pixel; ``mean_distance``, ``std_distance``: the cluster members' cosine distance to their centre."""
    scores = []
    for mask in masks:
        feature = model.features((image * mask)[None])[0]  # unit length
        distance = 1 - feature @ model.centroids[cluster]
        scores.append((distance - mean_distance) / std_distance)  # how much of an outlier the copy is
    scores = torch.stack(scores)[:, None, None]  # B x 1 x 1
    hidden, kept = 1 - masks[:, 0], masks[:, 0]  # B x H x W
    heat = (scores * hidden).sum(0) / hidden.sum(0).clamp_min(1e-6) - (scores * kept).sum(0) / kept.sum(0).clamp_min(
        1e-6
    )
    return min_max(heat)


# %% [markdown]
# The readable versions against the stage's batched kernels on four poisoned images of the sample (the
# network runs in `notebook.live_precision`, so one image at a time and a batch may round differently):

# %%
x4 = ctx.normalise(ctx.pixels[sample_p[:4]])
masks = search.search_masks(ctx).to(x4.device)
diff = {"patchsearch": 0.0, "poisoncam": 0.0}
for j, (i, image) in enumerate(zip(sample_p[:4], x4, strict=True)):
    c = int(ctx.assignment[i])
    mean_d, std_d = (torch.tensor(float(v)) for v in ctx.outlier_stats[c])
    readable = {
        "patchsearch": grad_cam_readable(ctx.model, image, c),
        "poisoncam": poisoncam_readable(ctx.model, image, c, masks, mean_d, std_d),
    }
    for m in diff:
        diff[m] = max(diff[m], float((readable[m].cpu() - maps[m]["poisoned"][j]).abs().max()))
notebook.show_markdown(
    f"Largest difference between the readable and the batched heatmaps (maps in [0, 1]): Grad-CAM "
    f"{diff['patchsearch']:.2g}, PoisonCAM {diff['poisoncam']:.2g} (precision: {ctx.model.precision})."
)

# %% [markdown]
# ## Localization accuracy, beside the guesses it must beat
# A candidate window *hits* the trigger when their overlap covers at least half of the smaller of the two
# (`localize.window_hits`). A hit rate means little alone: where the attacker's triggers gather near the
# centre, a fixed window at the centre hits them without looking at the image. So every rate stands beside
# two trivial guesses of the same side, by the same rule: the **centre window**, and a window at a
# **random place** (its exact expected hit rate, `localize.localization_baselines`). The defender does not
# know the trigger size: the rates are shown for every side of the search's sweep, the side each method's
# search picked blind (notebook 05) is marked, and the dashed line is the true side (for teaching only).

# %% tags=["hide-input"]
picked = {m: search.load_search(search.search_stage(search.with_method(P, m), "poisoned"))["window"] for m in maps}
windows = sorted({w for w in P.search.window_sweep if w <= ctx.size} | set(picked.values()))
rows = []
for w in windows:
    guess = localize.localization_baselines(boxes, w, ctx.size)
    row = {"window": w, "centre window": guess["centre"], "random window": guess["random"]}
    for method in ("patchsearch", "poisoncam"):
        xs, ys = localize.best_windows(maps[method]["poisoned"], w)
        row[method] = float(localize.window_hits_any(xs.numpy(), ys.numpy(), w, boxes).mean())
    rows.append(row)
acc = pd.DataFrame(rows)
for method in ("patchsearch", "poisoncam"):
    acc[f"{method} picked w"] = acc["window"] == picked[method]
plotting.save_table(acc, P.profile, NB, "localization_accuracy")
fig, ax = plt.subplots(figsize=(5.8, 3.6))
for method, label, color in (
    ("patchsearch", "PatchSearch (Grad-CAM)", "C0"),
    ("poisoncam", "PoisonCAM (masking)", "C1"),
):
    ax.plot(acc["window"], 100 * acc[method], "o-", color=color, label=label)
    at = acc[acc["window"] == picked[method]]
    ax.plot(at["window"], 100 * at[method], "*", ms=14, color=color, label=f"{label.split()[0]}: blind pick")
ax.plot(acc["window"], 100 * acc["centre window"], "s--", color="gray", label="centre window (guess)")
ax.plot(acc["window"], 100 * acc["random window"], "v:", color="gray", label="random window (guess)")
ax.axvline(side, ls="--", color="lightgray", label="true trigger side")
ax.set(
    xlabel="window side w (px)",
    ylabel="poisoned images: trigger hit (%)",
    ylim=(0, 102),
    title=f"trigger localization on {n} poisoned images",
)
ax.legend(fontsize=7, loc="best")
plotting.savefig(fig, P.profile, NB, "localization_accuracy", dpi=P.figures.dpi)
acc.round(3)

# %% [markdown]
# Which claims hold? A method localizes triggers only where it beats both guesses at the side its search
# actually used; the sentences below are computed from the table above.

# %%
claims = []
for method, label in (("patchsearch", "PatchSearch's Grad-CAM"), ("poisoncam", "PoisonCAM's masking")):
    r = acc[acc["window"] == picked[method]].iloc[0]
    best_guess = max(r["centre window"], r["random window"])
    verdict = "beats both guesses" if r[method] > best_guess else "does NOT beat the better guess"
    claims.append(
        f"- {label} at its blind w = {picked[method]} px hits the trigger of {100 * r[method]:.0f}% of the {n} "
        f"poisoned images{' (any of its triggers)' if P.attack.n_copies > 1 else ''}; the centre "
        f"window hits {100 * r['centre window']:.0f}% and a random window {100 * r['random window']:.0f}%: it "
        f"{verdict}."
    )
notebook.show_markdown("\n".join(claims))

# %% [markdown]
# ## PoisonCAM: which masks?
# The paper compares three mask strategies and prefers full coverage. The same comparison here, on a
# smaller sample (each strategy costs B forward passes per image), at the side PoisonCAM's search picked,
# beside the centre and random guesses of that side. (An evaluation with the ground truth, for the reader:
# the profile's strategy is the paper's choice, not this table's.)

# %% tags=["hide-input"]
m = min(64, n)
rows = []
for strategy in ("full", "random", "interval"):
    masks = localize.make_masks(
        strategy, P.search.masks, ctx.size, P.search.mask_grid, P.search.mask_keep, P.search.seed
    )
    x = ctx.normalise(ctx.pixels[sample_p[:m]])
    heat = localize.poisoncam_heatmaps(
        ctx.model, x, torch.as_tensor(ctx.assignment[sample_p[:m]]), masks, ctx.outlier_stats, P.search.batch_size
    )
    w_pc = picked["poisoncam"]
    xs, ys = localize.best_windows(heat, w_pc)
    guess = localize.localization_baselines(boxes[:m], w_pc, ctx.size)
    rows.append(
        {
            "strategy": strategy,
            "masks": P.search.masks,
            "images": m,
            "window": w_pc,
            "hit rate": float(localize.window_hits_any(xs.numpy(), ys.numpy(), w_pc, boxes[:m]).mean()),
            "centre window": guess["centre"],
            "random window": guess["random"],
        }
    )
strategies = pd.DataFrame(rows)
plotting.save_table(strategies, P.profile, NB, "mask_strategies")
hits = (strategies.set_index("strategy")["hit rate"] * m).round().astype(int)  # images, not shares
best_guess = max(strategies["centre window"].iloc[0], strategies["random window"].iloc[0]) * m
top_two = hits.sort_values().iloc[-2:]
ahead = int(top_two.iloc[1] - top_two.iloc[0])
share = top_two.iloc[1] / m
noise = 2 * np.sqrt(2 * m * share * (1 - share))  # two sd of the difference of two hit counts on m images
notebook.show_markdown(
    f"On {m} images: " + ", ".join(f"`{k}` hits {v}" for k, v in hits.items()) + f" (the better guess: "
    f"{best_guess:.0f}). "
    + (
        f"The two best, `{top_two.index[1]}` and `{top_two.index[0]}`, differ by {ahead} image"
        f"{'s' if ahead != 1 else ''}, within this sample's noise (about {noise:.0f} images at two standard "
        "deviations of a binomial difference): this sample does not rank them."
        if ahead <= noise
        else f"`{top_two.index[1]}` hits the most, {ahead} images ahead of `{top_two.index[0]}`, more than this "
        f"sample's noise (about {noise:.0f} images at two standard deviations of a binomial difference)."
    )
)
strategies

# %% [markdown]
# ## Exercises
# Each reruns this notebook's heatmaps (a minute or two; the search is not rerun).
#
# 1. **Fewer masks.** With `overrides={"search": {"masks": 64}}`, predict how PoisonCAM's hit rate in the
#    localization table moves, then rerun and compare. Does it still beat the centre window?
# 2. **Another layer.** `{"search": {"cam_layer": "layer3"}}` gives Grad-CAM a 4x4 grid instead of 8x8.
#    Predict the effect on the hit rate at the trigger's side and at `w = 4`, then check.
# 3. **The hit rule.** Recompute the table with `localize.window_hits(..., min_cover=0.25)` and then `0.75`.
#    Which numbers move more, the methods' or the baselines'? What does that tell you about how to
#    report a localization rate?
