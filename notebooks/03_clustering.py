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
# # 03 · Clustering: where do the poisons land in the backdoored model's embedding?
#
# Both defenses start the same way. The model trained on the (possibly poisoned) data embeds every
# training image; the embeddings are L2-normalised and clustered with k-means (faiss, on the GPU when
# there is one). Self-supervised models group similar images, and a trigger shared by the poisons makes
# them similar: the poisons should gather in a few clusters, and the trigger should be what holds those
# clusters together. The cluster centres also become the "classifier" that the next notebook explains.
#
# The number of clusters scales with the data: the paper uses 1,000 clusters for ImageNet-100's 127k
# images (about 127 per cluster); this profile keeps about the same number of images per cluster.
#
# **Ground truth is shown here for teaching only.** The defense itself never sees which images are
# poisoned.

# %% tags=["parameters"]
params_path = "params/cifar10.yaml"

# %%
import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from helpers import attack, cluster, data, defense, notebook, plotting

P = notebook.setup(params_path)
NB = "03_clustering"
D = data.load_data(P)
A = attack.run_attack(P, D)
poison = A.poison_mask(len(D.train.images))
X, _ = defense.training_set(P, "poisoned")  # the poisoned training set, as the defender sees it

# %% [markdown]
# ## Embed and cluster
# One cached stage: features of the whole poisoned training set from the backdoored model, then k-means.
# The assignment kept is the argmax of the cosine between an image's feature and the (normalised)
# centres: the same rule the search uses later.

# %%
stage = defense.cluster_stage(P, "poisoned")
Z = np.load(stage / "clustering.npz")
assignment, k = Z["assignment"], P.cluster.k
summary = json.loads((stage / "summary.json").read_text())
print(f"{len(assignment)} images, k = {k} clusters, {summary['seconds']:.1f} s (features + k-means, when computed)")

# %% [markdown]
# ## Cluster sizes, and where the poisons fall
# Each bar is a cluster, sorted by size; the red part is its poisoned images.

# %%
sizes = np.bincount(assignment, minlength=k)
poisons = np.bincount(assignment, weights=poison, minlength=k).astype(int)
order = np.argsort(-sizes)
fig, ax = plt.subplots(figsize=(10, 3))
ax.bar(range(k), sizes[order], color="lightgray", width=1.0, label="clean images")
ax.bar(range(k), poisons[order], color="crimson", width=1.0, label="poisoned images")
ax.set(xlabel="cluster (sorted by size)", ylabel="images", title=f"{k} clusters of {len(assignment)} training images")
ax.legend()
plotting.savefig(fig, P.profile, NB, "cluster_sizes", dpi=P.figures.dpi)

# %%
conc = cluster.poison_concentration(assignment, poison)
purity = poisons / np.maximum(sizes, 1)
top = np.argsort(-poisons)[:10]
table = pd.DataFrame(
    {"cluster": top, "size": sizes[top], "poisons": poisons[top], "poisoned share": purity[top].round(3)}
)
plotting.save_table(table, P.profile, NB, "poison_clusters")
print(
    f"poisons: {poison.sum()}; share in clusters at least half poisoned: {conc['poison_share_in_rich_clusters']:.1%} "
    f"({conc['rich_clusters']} clusters); largest share of all poisons in one cluster: "
    f"{conc['largest_poison_share_one_cluster']:.1%}"
)
table

# %% [markdown]
# ## What a poisoned cluster looks like
# The images of the most poisoned cluster (trigger boxes in green), next to a clean cluster of similar
# size: the poisoned one is held together by the trigger, not by what the images show.


# %%
def cluster_grid(c, n):
    members = np.flatnonzero(assignment == c)[:n]
    boxes = A.boxes_of(members)
    titles = [D.train.classes[D.train.labels[i]] for i in members]
    return plotting.show_images(X[members].numpy(), titles, boxes, ncols=8)


n = P.figures.n_examples
fig = cluster_grid(int(top[0]), n)
fig.suptitle(f"cluster {top[0]}: {poisons[top[0]]} of {sizes[top[0]]} poisoned", y=1.02)
plotting.savefig(fig, P.profile, NB, "poisoned_cluster", dpi=P.figures.dpi)
clean_c = int(np.argsort(np.abs(sizes - sizes[top[0]]) + 1e6 * (poisons > 0))[0])
fig = cluster_grid(clean_c, n)
fig.suptitle(f"cluster {clean_c}: no poisons", y=1.02)
plotting.savefig(fig, P.profile, NB, "clean_cluster", dpi=P.figures.dpi)

# %% [markdown]
# ## The flip-test set
# The search will paste candidate triggers on one image per cluster, the one nearest its centre: these
# are the images hardest to move to another cluster, so only a real trigger should flip many of them.

# %%
flip = Z["flip_idx"]
print(f"flip-test set: {len(flip)} images, {poison[flip].sum()} of them poisoned")
