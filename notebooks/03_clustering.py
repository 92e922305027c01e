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
# there is one; torch's where faiss is missing). Self-supervised models group similar images, and a trigger shared by the poisons makes
# them similar: the poisons should gather in a few clusters, and the trigger should be what holds those
# clusters together. The cluster centres also become the "classifier" that the next notebook explains.
#
# The number of clusters scales with the data: the paper keeps about a hundred images per cluster (its
# `clusters` for its `train_images` in `params/paper.yaml`); this profile's `cluster.k` keeps about as many.
#
# **Ground truth is shown here for teaching only.** The defense itself never sees which images are
# poisoned.
#
# **Which model.** The backdoored model here is the profile's first SSL training. Whether its trigger moves a
# linear probe enough to count as a backdoor (the project's rule), and how often other SSL seeds of the same
# attack do, is measured at the end of notebook 02 and in notebook 07: the poisons can gather in the
# embedding (this notebook) while the probe is fooled only a little. The defenses read the embedding.

# %% [markdown]
# ## In equations
# With the backbone $f$ and $z_i = f(x_i) / \lVert f(x_i) \rVert$, k-means with $k$ clusters (`cluster.k`)
# finds centres $\mu_1, \dots, \mu_k$ that minimise $\sum_i \lVert z_i - \mu_{c(i)} \rVert^2$. Both defenses
# then read the normalised centres $\hat\mu_c$ as a cosine classifier: an image's "class" is
#
# $$c(x) = \arg\max_c \; \hat\mu_c \cdot z(x).$$
#
# The **flip-test set** $F$ holds, for every cluster, the member nearest its centre (notebook 05 uses it).

# %% tags=["parameters"]
params_path = "params/cifar10.yaml"

# %%
import json
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from helpers import attack, cluster, data, notebook, plotting

P = notebook.setup(params_path)
NB = "03_clustering"
notebook.show_markdown(notebook.opening(P, NB))  # where it sits, what it costs
D = data.load_data(P)
A = attack.run_attack(P, D)
poison = A.poison_mask(len(D.train.images))
X, _ = cluster.training_set(P, "poisoned")  # the poisoned training set, as the defender sees it

# %% [markdown]
# ## Embed and cluster
# One cached stage: features of the whole poisoned training set from the backdoored model, then k-means.
# The assignment kept is the argmax of the cosine between an image's feature and the (normalised)
# centres: the same rule the search uses later.

# %%
stage = cluster.cluster_stage(P, "poisoned")
Z = np.load(stage / "clustering.npz")
assignment, k = Z["assignment"], P.cluster.k
summary = json.loads((stage / "summary.json").read_text())
kmeans_by = summary.get("kmeans", "faiss")  # the stage's k-means: faiss, or torch where faiss is missing
# the shipped clustering leaves its features out: extracted again here, in notebook.live_precision
features = Z["features"] if "features" in Z.files else cluster.training_features(notebook.live(P), "poisoned")
print(f"{len(assignment)} images, k = {k} clusters, {summary['seconds']:.1f} s (features + k-means, when computed)")

# %% [markdown]
# ## k-means and the cluster classifier, written out
# The stage runs faiss (where faiss is not installed, the same algorithm in torch); the idea fits in a
# few lines. Spherical k-means on unit-length embeddings: start
# from k random embeddings, then repeat two steps: give every embedding to the centre with the largest
# cosine, and move every centre to the mean of its members, scaled back to unit length. The first step
# alone is the **cluster classifier** the defenses use from here on: the centres are the weights of a
# linear layer on unit-length features, and an image's "class" is its cluster.


# %% tags=["readable"]
def unit(x):
    """Rows scaled to length 1: the cosine of two unit vectors is their dot product."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def assign_readable(features, centres):
    """The cluster classifier: each embedding goes to the centre with the largest cosine."""
    return np.argmax(unit(features) @ unit(centres).T, axis=1)


def kmeans_readable(features, k, iterations=20, seed=0):
    """Spherical k-means: returns the unit-length centres and each embedding's cluster."""
    x = unit(features)
    centres = x[np.random.default_rng(seed).choice(len(x), k, replace=False)]
    for _ in range(iterations):
        assignment = assign_readable(x, centres)
        for c in range(k):
            members = x[assignment == c]
            if len(members):  # an empty cluster keeps its centre
                centres[c] = unit(members.mean(0, keepdims=True))[0]
    return centres, assign_readable(x, centres)


# %% [markdown]
# Run on the stage's embeddings, the readable version gives a clustering of its own (another start,
# another partition), and its classifier step applied to the stage's centres gives back the stage's
# assignment:

# %%
start = time.perf_counter()
centres_r, assignment_r = kmeans_readable(features, k, P.cluster.iterations, P.cluster.seed)
seconds_r = time.perf_counter() - start
same = float((assign_readable(features, Z["centroids"]) == assignment).mean())
conc_r = cluster.poison_concentration(assignment_r, poison)
conc_f = cluster.poison_concentration(assignment, poison)
notebook.show_markdown(
    f"- the cluster classifier on {kmeans_by}'s centres reproduces {100 * same:.2f}% of the stage's assignments;\n"
    f"- readable k-means ({seconds_r:.1f} s in numpy): {100 * conc_r['poison_share_in_rich_clusters']:.0f}% of "
    f"the poisons in clusters at least half poisoned, against {100 * conc_f['poison_share_in_rich_clusters']:.0f}% "
    f"for {kmeans_by}'s clustering ({conc_r['rich_clusters']} and {conc_f['rich_clusters']} such clusters)."
)

# %% [markdown]
# ## Cluster sizes, and where the poisons fall
# Each bar is one cluster, sorted by size: its height is the cluster's size, split into its clean images
# (grey, below) and its poisoned images (red, stacked on top). The right panel sorts the clusters by
# their number of poisons instead, so the poison-rich ones line up at the left.

# %%
sizes = np.bincount(assignment, minlength=k)
poisons = np.bincount(assignment, weights=poison, minlength=k).astype(int)
fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True, gridspec_kw={"width_ratios": [3, 1]})
for ax, order, what in (
    (axes[0], np.argsort(-sizes, kind="stable"), "size"),
    (axes[1], np.argsort(-poisons, kind="stable")[:20], "poisons (the 20 most)"),
):
    x = np.arange(len(order))
    ax.bar(x, sizes[order] - poisons[order], color="lightgray", width=1.0, label="clean images")
    ax.bar(x, poisons[order], bottom=sizes[order] - poisons[order], color="crimson", width=1.0, label="poisoned images")
    ax.set(xlabel=f"cluster (sorted by {what})", xlim=(-0.5, len(order) - 0.5))
axes[0].set(ylabel="images in the cluster", title=f"{k} clusters of {len(assignment)} training images")
axes[1].set_title("the most poisoned clusters")
axes[0].legend(loc="upper right")
fig.tight_layout()
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
# size. Is the poisoned one held together by the trigger, or by what the images show? Every poison here is
# an image of the target class, so a cluster of that class alone would look much the same; the baseline is
# the clean model's embedding of the same images (notebook 02), read out below the figures.


# %% tags=["hide-input"]
def cluster_grid(c, n):
    members = np.flatnonzero(assignment == c)[:n]
    boxes = A.boxes_of(members)
    titles = [D.train.classes[D.train.labels[i]] for i in members]
    return plotting.show_images(X[members].numpy(), titles, boxes, ncols=6)


n = P.figures.n_examples
fig = cluster_grid(int(top[0]), n)
fig.suptitle(f"cluster {top[0]}: {poisons[top[0]]} of {sizes[top[0]]} poisoned", y=1.02)
plotting.savefig(fig, P.profile, NB, "poisoned_cluster", dpi=P.figures.dpi)
clean_c = int(np.argsort(np.abs(sizes - sizes[top[0]]) + 1e6 * (poisons > 0))[0])
fig = cluster_grid(clean_c, n)
fig.suptitle(f"cluster {clean_c}: no poisons", y=1.02)
plotting.savefig(fig, P.profile, NB, "clean_cluster", dpi=P.figures.dpi)
baseline_csv = notebook.figure_path(P.profile, "02_ssl_training_poison_concentration.csv")  # written by notebook 02
if baseline_csv.is_file():
    base = pd.read_csv(baseline_csv).set_index("features of")
    clean_row, ours = base.loc["clean model (baseline)"], base.loc["backdoored model"]
    notebook.show_markdown(
        f"With the clean model's features (notebook 02's clustering of the same images), "
        f"{100 * clean_row['poison_share_in_rich_clusters']:.1f}% of the poisons fall in clusters at least half "
        f"poisoned and the purest cluster is {100 * clean_row['max_cluster_purity']:.0f}% poisons; with the "
        f"backdoored model's, {100 * ours['poison_share_in_rich_clusters']:.1f}% and "
        f"{100 * ours['max_cluster_purity']:.0f}%. The target class alone does not gather its images this tightly: "
        f"the trigger does, in this one SSL training (seed {P.ssl.seed})."
        if ours["poison_share_in_rich_clusters"] > 2 * clean_row["poison_share_in_rich_clusters"]
        else f"With the clean model's features, {100 * clean_row['poison_share_in_rich_clusters']:.1f}% of the "
        f"poisons fall in clusters at least half poisoned, against {100 * ours['poison_share_in_rich_clusters']:.1f}% "
        "with the backdoored model's: the class, not the trigger, may be what gathers them."
    )

# %% [markdown]
# ## The flip-test set
# The search will paste candidate triggers on one image per cluster, the one nearest its centre: these
# are the images hardest to move to another cluster, so only a real trigger should flip many of them.

# %%
flip = Z["flip_idx"]
print(f"flip-test set: {len(flip)} images, {poison[flip].sum()} of them poisoned")

# %% [markdown]
# ## Exercises
# Each reruns one clustering stage (features and k-means: about a minute).
#
# 1. **Fewer, larger clusters.** With `overrides={"cluster": {"k": 50}}`, predict whether the share of
#    poisons in poison-rich clusters (printed above) rises or falls, then rerun and check. Then try
#    `{"cluster": {"k": 200}}`. Which k comes closest to the paper's images per cluster here?
# 2. **Without the trigger.** Cluster the clean model's embedding (`cluster.cluster_stage(P, "clean")`)
#    and find the cluster holding the most images of the target class. Is it as pure as the most
#    poisoned cluster above? What holds each together?
# 3. **Another seed.** `{"cluster": {"seed": 1}}`: do the same poisoned clusters come back (compare the
#    `poison_clusters` table)? What would change for the search if they did not?
