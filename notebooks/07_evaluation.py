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
# # 07 · Evaluation: does the backdoor work, and what do defenses change?
#
# The papers' protocol: freeze the SSL backbone, train a **linear probe** with a few clean labels
# (1% and 10% of the training set, seeded class-balanced subsets, 5 seeds: mean ± std), then measure on
# the validation set
#
# - **Clean data**: accuracy, and **FP** = non-target images predicted as the target category;
# - **Patched data** (every non-target validation image with the trigger): accuracy, FP, and the attack
#   success rate **ASR = FP / number of non-target images**.
#
# A working backdoor leaves clean accuracy alone and drives patched FP up. kNN accuracy (all training
# labels, k = 20) is a cheap extra. Here the probe is a logistic regression on features computed once
# (no augmentation): on a CPU that replaces the papers' probe trained for epochs on augmented images.
#
# This notebook produces the rows of the paper's Table 2 for this profile: **Clean**, **Backdoored**,
# **Clean + i-CutMix**, **Backdoored + i-CutMix** (the defenses' rows join later).

# %% tags=["parameters"]
params_path = "params/cifar10.yaml"

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from helpers import attack, data, evaluate, notebook, plotting

P = notebook.setup(params_path)
NB = "07_evaluation"
D = data.load_data(P)
A = attack.run_attack(P, D)

# %% [markdown]
# ## The four models
# Each is trained (or loaded from the cache) and evaluated once; the evaluation is cached too.

# %%
MODELS = {
    "Clean": ("clean", False),
    "Backdoored": ("poisoned", False),
    "Clean + i-CutMix": ("clean", True),
    "Backdoored + i-CutMix": ("poisoned", True),
}
results = {name: evaluate.evaluate_stage(P, variant, icutmix) for name, (variant, icutmix) in MODELS.items()}

# %% [markdown]
# ## Table 2 (this profile)
# Mean ± std over the probe seeds. FP counts are out of the non-target validation images.

# %%
n_non_target = int((D.val.labels != A.target_index).sum())
table = pd.DataFrame([evaluate.table2_row(name, probe, knn, fraction)
                      for fraction in P.eval.label_fractions for name, (_, probe, knn) in results.items()])
plotting.save_table(table, P.profile, NB, "table2")
print(f"target: {A.target_class}; non-target validation images: {n_non_target}")
table

# %% [markdown]
# Per-seed numbers, for anyone who wants to test a difference:

# %%
per_seed = pd.concat([probe.assign(model=name) for name, (_, probe, _) in results.items()], ignore_index=True)
plotting.save_table(per_seed, P.profile, NB, "table2_per_seed")
per_seed.groupby(["model", "labels"])[["clean_acc", "patched_acc", "patched_fp", "asr"]].mean()

# %% [markdown]
# ## Where the patched images go
# Confusion matrices of the probe (largest label fraction) on patched data: a backdoor shows up as a
# bright column at the target category.

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
for ax, name in zip(axes, ["Clean", "Backdoored"], strict=True):
    cm = np.load(results[name][0] / "probe_confusion_patched.npy")
    cm = cm[np.arange(len(cm)) != A.target_index]  # patched data has no target-class images
    rows = [c for i, c in enumerate(D.val.classes) if i != A.target_index]
    im = ax.imshow(cm / cm.sum(1, keepdims=True), cmap="magma", vmin=0, vmax=1)
    ax.set(title=f"{name} model, patched data", xticks=range(len(D.val.classes)), yticks=range(len(rows)),
           xlabel="predicted", ylabel="true")
    ax.set_xticklabels(D.val.classes, rotation=90, fontsize=7)
    ax.set_yticklabels(rows, fontsize=7)
    ax.get_xticklabels()[A.target_index].set_color("red")
fig.colorbar(im, ax=axes, fraction=0.025)
plotting.savefig(fig, P.profile, NB, "confusion_patched", dpi=P.figures.dpi)
