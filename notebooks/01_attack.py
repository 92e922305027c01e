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

# %% [markdown]
# # 01 · The attack: poisoning an unlabelled data set with a trigger patch
#
# **Threat model** (Saha et al., CVPR 2022, as used by PatchSearch and PoisonCAM). An attacker who can
# add images to a victim's *unlabelled* training set picks a **target category** and a small **trigger**
# patch. It pastes the trigger, fully opaque, at a random place on part of the target category's images.
# The victim pre-trains a self-supervised model (MoCo, BYOL, ...) on the data and trains a linear
# classifier on top with a few clean labels. If the attack works, the model ties the trigger to the
# target: any image *with the trigger* is then classified as the target category (a **false positive**),
# while clean images are classified as well as by a clean model, which hides the attack.
#
# The defender (notebooks 03-07) sees only the poisoned, unlabelled data and the model trained on it:
# not the trigger, not the target, not which images are poisoned. The ground truth written here is for
# **evaluation only**.
#
# This notebook plants the attack with the paper's settings, scaled to the profile's image size: the table
# under *Planting the attack* sets the paper's (`params/paper.yaml`) beside the profile's.

# %% [markdown]
# ## In equations
# The attack of [Saha et al.](https://arxiv.org/abs/2105.10123), which [PatchSearch](https://arxiv.org/abs/2304.01482) and [PoisonCAM](https://arxiv.org/abs/2312.07955) defend against. For a target category $t$ and a trigger $p$ of
# side $w$, each chosen training image $x$ of category $t$ becomes $x \oplus_{(u,v)} p$: the trigger pasted,
# fully opaque, with its top-left corner at $(u, v)$, drawn uniformly with the margin $m$ (`attack.train_margin`):
#
# $$u, v \sim \mathcal{U}\{\lfloor m W \rfloor, \dots, \lfloor (1 - m) W \rfloor - w\}.$$
#
# The patched validation set pastes the same trigger on every validation image of the other categories.

# %% tags=["parameters"]
params_path = "params/cifar10.yaml"

# %%
import numpy as np
import pandas as pd
import torch

from helpers import attack, data, notebook, paths, plotting

P = notebook.setup(params_path)
NB = "01_attack"
notebook.show_markdown(notebook.opening(P, NB))  # where it sits, what it costs
rng = np.random.default_rng(0)  # only picks which examples to show

# %% [markdown]
# ## The data
# The training and validation splits are decoded once into uint8 arrays and cached under
# `artifacts/data/<hash>/`; a rerun loads them in a fraction of a second.

# %%
D = data.load_data(P)
train_counts = np.bincount(D.train.labels, minlength=len(D.train.classes))
print(f"train: {len(D.train.images)} images {D.train.pixels.shape[1:]}, val: {len(D.val.images)} images")
pd.DataFrame({"class": D.train.classes, "train images": train_counts})

# %% [markdown]
# ## The trigger
# HTBA triggers are random colour grids made smooth by bilinear upsampling. The same grid renders at any
# side length, so a profile can scale it with the image.

# %%
trigger = attack.make_trigger(P.attack)
side = attack.trigger_side(P.attack, *D.train.pixels.shape[2:])
fig = plotting.show_images(
    [trigger.at(side).numpy(), trigger.at(8 * side).numpy()],
    titles=[f"{side}x{side} (as pasted)", "the same, rendered large"],
    ncols=2,
    scale=2.2,
)
plotting.savefig(fig, P.profile, NB, "trigger", dpi=P.figures.dpi)

# %% [markdown]
# ## Planting the attack
# One cached stage (`artifacts/attack/<hash>/`) draws the poisoned images and trigger locations from
# `attack.seed`, pastes the trigger with the batched paste kernel, and writes: the poisoned images as PNG,
# SSL-Backdoor file lists (`train_poisoned.txt`, `val_patched.txt`: `<path> <class index>` per line), the
# exact recipe (`recipe.npz`) and the ground truth (`ground_truth/poison_boxes.csv`).

# %%
A = attack.run_attack(P, D)
counts = pd.DataFrame([A.counts]).T.reset_index()
counts.columns = ["quantity", "value"]
plotting.save_table(counts, P.profile, NB, "counts")
print("attack outputs:", paths.shown(A.path))
counts

# %% tags=["remove-input"]
notebook.show_markdown(notebook.attack_settings(P, tuple(D.train.pixels.shape), A.poison_idx.size))

# %% [markdown]
# ## Poisoned training images
# Top row: clean originals; bottom row: the same images as the victim receives them, with the trigger
# (its true box in green, drawn here for teaching; the defense never sees it).

# %%
poisoned_pixels = attack.poisoned_train_pixels(D, A, P.data.image_size)
n_show = min(P.figures.n_examples // 2, 6, len(A.poison_idx))  # six pairs fit the page's width
shown = np.sort(rng.choice(len(A.poison_idx), size=n_show, replace=False))
idx = A.poison_idx[shown]
fig = plotting.show_images(
    np.concatenate([D.train.pixels[idx], poisoned_pixels[idx].numpy()]),
    titles=["clean"] * n_show + ["poisoned"] * n_show,
    boxes=[np.zeros((0, 4))] * n_show + list(A.poison_boxes[shown]),
    ncols=n_show,
)
plotting.savefig(fig, P.profile, NB, "poisoned_train", dpi=P.figures.dpi)

# %% [markdown]
# The in-memory recipe and the PNG files the file list points to are two forms of the same poisoned set:
# decoding the files gives the same pixels, bit for bit.

# %%
files = [A.train_poisoned.paths[i] for i in A.poison_idx]
from_files = torch.from_numpy(data.decode_images(files, P.data.image_size, progress=False))
assert torch.equal(from_files, poisoned_pixels[A.poison_idx]), "file list and recipe disagree"
print(f"{len(files)} poisoned files match the recipe exactly")

# %% [markdown]
# ## The patched validation set
# To measure the attack, every non-target validation image gets **one** trigger (the poisons may carry
# several) at a random place, with its own margin (`attack.val_margin`: the settings table above sets the
# paper's and the profile's side by side). A backdoored model calls many of them the target category; a clean
# one does not.

# %%
patched = attack.patched_val_pixels(D, A)
n_show = min(P.figures.n_examples, len(A.val_idx))
shown = np.sort(rng.choice(len(A.val_idx), size=n_show, replace=False))
fig = plotting.show_images(
    patched[shown].numpy(),
    titles=[D.val.classes[D.val.labels[i]] for i in A.val_idx[shown]],
    boxes=A.val_boxes[shown],
    ncols=min(6, n_show),
)
plotting.savefig(fig, P.profile, NB, "patched_val", dpi=P.figures.dpi)

# %% [markdown]
# ## Where the triggers land
# Top-left corners of the triggers, training poisons and patched validation images. With the paper's
# margin (`params/paper.yaml`) and a trigger of this profile's share of a small image, every training trigger
# would overlap the image centre: a defense that simply guessed "the centre" would find them all. The profile spreads the training
# triggers over nearly the whole image (`attack.train_margin`), and the table below measures what such a guess
# would get: the share of training triggers that a fixed window at the centre hits (overlap of at least
# half the smaller of the two, `localize.window_hits`), for windows of several sides. The localizations of
# notebook 04 are compared with the same guess.

# %%
import matplotlib.pyplot as plt

height, width = D.val.pixels.shape[2:]
fig, axes = plt.subplots(1, 2, figsize=(7, 3.4), sharex=True, sharey=True)
for ax, boxes, title in [(axes[0], A.poison_boxes, "training poisons"), (axes[1], A.val_boxes, "patched validation")]:
    corners = boxes.reshape(-1, 4)
    ax.hist2d(corners[:, 0], corners[:, 1], bins=np.arange(width + 1) - 0.5, cmap="viridis")
    ax.set(
        title=f"{title} (n={len(corners)})",
        xlabel="x of top-left corner",
        xlim=(-0.5, width - 0.5),
        ylim=(height - 0.5, -0.5),
    )
axes[0].set_ylabel("y of top-left corner")
fig.tight_layout()
plotting.savefig(fig, P.profile, NB, "trigger_locations", dpi=P.figures.dpi)

# %% tags=["hide-input"]
from helpers import localize

side = int(A.poison_boxes[0, 0, 2])
centre = pd.DataFrame(
    [
        {"window side (px)": w, **localize.localization_baselines(A.poison_boxes[:, :, :3], w, width)}
        for w in sorted({side, *P.search.window_sweep})
        if w <= width
    ]
).rename(columns={"centre": "centre window hits", "random": "random window hits"})
plotting.save_table(centre.round(3), P.profile, NB, "centre_guess")
share = float(centre.loc[centre["window side (px)"] == side, "centre window hits"].iloc[0])
notebook.show_markdown(
    f"A centre window of the trigger's own side ({side} px) hits the trigger of **{100 * share:.0f}%** of the "
    f"poisoned training images"
    + (f" (any of its {P.attack.n_copies} triggers)" if P.attack.n_copies > 1 else "")
    + f" (margin {P.attack.train_margin:g}); the largest window of the search's sweep hits "
    f"{100 * centre['centre window hits'].iloc[-1]:.0f}%. A hit needs the window to cover half of the trigger, or "
    "the trigger to cover half of the window, so a window much smaller than the trigger hits whenever it falls "
    "inside one: the rate is not monotone in the side."
)
centre.round(3)

# %% [markdown]
# ## What the next notebooks use
# - `A.train_poisoned` (and `train_poisoned.txt`): the poisoned, unlabelled training set the victim trains on.
# - `A.val_patched` (and `val_patched.txt`): the patched validation set for the attack success rate.
# - `A.poison_mask(n)` and `ground_truth/`: which images are poisoned, for evaluating the defenses only.

# %%
print("poisoned training list:", paths.shown(A.path / "train_poisoned.txt"))
print("patched validation list:", paths.shown(A.path / "val_patched.txt"))
print("ground truth (evaluation only):", paths.shown(A.path / "ground_truth" / "poison_boxes.csv"))

# %% [markdown]
# ## Exercises
# Each runs from the cache in about a minute. To change a knob without editing the params file, replace
# the setup line with `P = notebook.setup(params_path, overrides={...})`; the outputs then go to
# `runs/cifar10/figures/`, never over the published ones.
#
# 1. **Where the attacker puts the trigger.** With `overrides={"attack": {"train_margin": 0.25}}` (the
#    paper's margin), predict the centre window's hit rate at the trigger's side before you rerun, then
#    compare with the `centre_guess` table above. Why does the margin decide whether a defense that only
#    looks at the image centre would look clever?
# 2. **Another trigger.** Try `{"attack": {"trigger_seed": 11}}` and `{"attack": {"trigger_grid": 2}}`.
#    Which trigger would you expect a network to notice more easily, and why (colour contrast, edges)?
# 3. **How many poisons?** With `{"attack": {"poison_rate": 0.5}}`, predict the `counts` table (poisoned
#    images, share of the training set), rerun and check. Which `poison_rate` would poison the paper's
#    share of the whole training set (the table above) here?
