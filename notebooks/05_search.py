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
# # 05 · Search: poison scores by the flip test, and the iterative search
#
# **Poison score.** The candidate trigger of an image (its best `w x w` window, notebook 04) is pasted at a
# random place on every image of the *flip-test set* (per cluster, the image nearest its centre: the
# hardest to move). The score is how many flip-test images are assigned to the candidate's cluster after
# pasting, minus how many were before. A real trigger drags images into the poisoned clusters; an
# ordinary patch of an ordinary image does not. The flip test runs batched over candidates and flip
# images together; `make bench` compares it with a per-candidate loop like the official code's (same
# scores, same seed).
#
# **Iterative search.** Scoring every image is wasteful when poisons gather in a few clusters. Each round
# every surviving cluster gives `s = 2` random unscored images; a cluster's score is the best score of
# its images; the lowest `r = 25%` of the clusters are pruned. Poisoned clusters survive to the end, so
# most scored images come from them.
#
# **Choosing w without knowing the trigger.** If w is wrong, most scores look alike; the paper proposes
# the w whose scores have the largest relative standard deviation (RSD = std / mean, its Figure 4). The
# search runs for every w of `search.window_sweep` and plots the RSD (star: the RSD's pick) with the
# top-20 accuracy each w reaches (ground truth, for teaching only). The w actually used is
# `search.window_px` when the profile sets it (the paper ran its main results at a fixed w = 60 for its
# 50 px trigger; the CPU profile keeps that window-to-trigger ratio), else the RSD's pick.

# %% tags=["parameters"]
params_path = "params/cifar10.yaml"

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image

from helpers import attack, data, defense, notebook, plotting, search

P = notebook.setup(params_path)
NB = "05_search"
D = data.load_data(P)
A = attack.run_attack(P, D)
poison = A.poison_mask(len(D.train.images))
METHODS = {"patchsearch": "PatchSearch", "poisoncam": "PoisonCAM"}
stages = {m: defense.search_stage(defense.with_method(P, m), "poisoned") for m in METHODS}
found = {m: defense.load_search(path) for m, path in stages.items()}

# %% [markdown]
# ## Which w? (paper Figure 4)

# %%
rows = []
for m, f in found.items():
    for _, r in f["sweep"].iterrows():
        w = int(r["window"])
        res = search.SearchResult(f[f"scores_w{w}"], f[f"scored_w{w}"])
        rows.append(
            {
                "method": METHODS[m],
                "window": w,
                "RSD": r["rsd"],
                "scored": int(r["scored"]),
                "top-20 acc (ground truth)": search.top_k_accuracy(res.ranking(), poison, 20),
                "RSD pick": bool(r["rsd_pick"]),
                "used": w == f["window"],
            }
        )
sweep = pd.DataFrame(rows)
plotting.save_table(sweep, P.profile, NB, "window_sweep")
side = int(A.poison_boxes[0, 0, 2])
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
for label in METHODS.values():
    t = sweep[sweep["method"] == label]
    for ax, col in zip(axes, ("RSD", "top-20 acc (ground truth)"), strict=True):
        scale = 100 if col.startswith("top") else 1
        (line,) = ax.plot(t["window"], scale * t[col], "o-", label=label)
        pick, used = t[t["RSD pick"]], t[t["used"]]
        ax.plot(pick["window"], scale * pick[col], "*", color=line.get_color(), ms=16, mec="k")
        ax.plot(used["window"], scale * used[col], "o", color="none", ms=14, mec=line.get_color(), mew=2)
for ax in axes:
    ax.axvline(side, ls="--", color="gray", lw=1)
    ax.set_xlabel("window side w (px)")
axes[0].set(ylabel="RSD of poison scores", title="star: largest RSD; ring: the w used")
axes[1].set(ylabel="top-20 accuracy (%)", ylim=(-2, 102), title="what it buys (ground truth; dashed: trigger side)")
axes[0].legend(fontsize=8)
fig.tight_layout()
plotting.savefig(fig, P.profile, NB, "window_rsd", dpi=P.figures.dpi)
sweep

# %% [markdown]
# ## The search, round by round (chosen w)
# Clusters alive, and the share of poisons among the images scored in each round.

# %%
fig, ax = plt.subplots(figsize=(6, 3.2))
for m, label in METHODS.items():
    f = found[m]
    r = f["rounds"][f["rounds"]["window"] == f["window"]]
    ax.plot(r["round"], r["clusters"], "o-", label=f"{label} (w = {f['window']})")
ax.set(xlabel="round", ylabel="clusters alive", yscale="log", title="iterative search: clusters left per round")
ax.legend(fontsize=8)
plotting.savefig(fig, P.profile, NB, "rounds", dpi=P.figures.dpi)

rows = []
for m, f in found.items():
    ranking = f["ranking"]
    rows.append(
        {
            "method": METHODS[m],
            "window": f["window"],
            "scored images": int(f["scored"].sum()),
            "poisons among scored": int(poison[f["scored"]].sum()),
            "top-20 acc": search.top_k_accuracy(ranking, poison, 20),
            "top-100 acc": search.top_k_accuracy(ranking, poison, 100),
            "heatmaps": f["summary"]["heatmaps"],
            "seconds": round(f["summary"]["seconds"], 1),
        }
    )
summary = pd.DataFrame(rows)
plotting.save_table(summary, P.profile, NB, "search_summary")
summary

# %% [markdown]
# ## Poison scores of scored images
# Scores of the poisoned and the clean images the search scored (chosen w).

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for ax, (m, f) in zip(axes, found.items(), strict=True):
    s = f["scores"]
    bins = np.arange(s[f["scored"]].min() - 0.5, s[f["scored"]].max() + 1.5)
    ax.hist(
        [s[f["scored"] & ~poison], s[f["scored"] & poison]],
        bins=bins,
        stacked=True,
        color=["lightgray", "crimson"],
        label=["clean", "poisoned"],
    )
    ax.set(title=f"{METHODS[m]} (w = {f['window']})", xlabel="poison score (flips)", ylabel="scored images")
    ax.legend(fontsize=8)
fig.tight_layout()
plotting.savefig(fig, P.profile, NB, "score_histogram", dpi=P.figures.dpi)

# %% [markdown]
# ## The top-ranked candidate triggers
# The 20 best patches of each method (red title: cut from a poisoned image). These are what the poison
# classifier of notebook 06 learns to find.

# %%
for m, path in stages.items():
    files = sorted((path / "top_patches").glob("*.png"))[:20]
    idx = [int(f.stem.split("_")[1]) for f in files]
    pics = [np.asarray(Image.open(f)).transpose(2, 0, 1) for f in files]
    fig = plotting.show_images(pics, [f"#{i}" for i in idx], ncols=10, scale=1.0)
    for ax, i in zip(fig.axes, idx, strict=False):
        ax.title.set_color("crimson" if poison[i] else "black")
    fig.suptitle(f"{METHODS[m]}: top-20 candidate triggers", y=1.02)
    plotting.savefig(fig, P.profile, NB, f"top_patches_{m}", dpi=P.figures.dpi)
