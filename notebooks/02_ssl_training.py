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
# # 02 · Self-supervised training: how the trigger becomes a feature
#
# The victim trains a self-supervised model on the (poisoned) unlabelled data. Contrastive methods like
# **MoCo-v2** pull two random augmentations ("views") of the same image together and push views of other
# images apart; **BYOL** predicts one view's embedding from the other without negatives. Nothing tells
# the model what matters in an image: whatever helps match the two views is learned. A trigger that
# sits on hundreds of images of one category and often survives cropping (the colour jitter changes it as much
# as the rest of the view) is an easy thing to match, so the poisoned images end up near each other, and near the target category.
#
# This notebook trains a clean and a backdoored model with the profile's settings (cached under
# `artifacts/ssl_*/`), then looks at what the backdoored model learned. It reads ahead to measures that
# later notebooks define: the **ASR** (attack success rate: the share of patched images of other
# categories that a linear **probe** on the model's features sends to the target category; notebook 07),
# and a search's **top-20 accuracy** (the share of poisons among its twenty most suspicious images;
# notebook 05). The [glossary](glossary.md) defines every term.

# %% [markdown]
# ## In equations
# **MoCo-v2** ([PatchSearch](https://arxiv.org/abs/2304.01482) Sec. 4 trains it; Chen et al. 2020). Two augmented views of an image give a query
# $q = g_\theta(f_\theta(x_1))$ and a key $k^+ = g_\xi(f_\xi(x_2))$ from a momentum copy of the network, both
# L2-normalised. With a queue $\{k_j\}_{j=1}^{K}$ of earlier keys as negatives and a temperature $\tau$
# (`ssl.queue_size`, `ssl.temperature`), the InfoNCE loss is
#
# $$\mathcal{L}(q, k^+) = -\log \frac{\exp(q \cdot k^+ / \tau)}{\exp(q \cdot k^+ / \tau) + \sum_{j=1}^{K} \exp(q \cdot k_j / \tau)},$$
#
# averaged over the batch and, with `ssl.symmetric`, over both orders of the views. After each step the key
# network follows the query network, $\xi \leftarrow \mu\,\xi + (1 - \mu)\,\theta$ (`ssl.momentum`), and the
# batch's keys replace the oldest in the queue. The backbone $f_\theta$ is what the defense and the probe use.
# **i-CutMix** (the option `ssl.icutmix`) is written out in notebook 08.

# %% tags=["parameters"]
params_path = "params/cifar10.yaml"

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from helpers import attack, augment, cluster, data, evaluate, models, notebook, params, plotting, ssl

P = notebook.setup(params_path)
NB = "02_ssl_training"
notebook.show_markdown(notebook.opening(P, NB))  # where it sits, what it costs
D = data.load_data(P)
A = attack.run_attack(P, D)
poisoned_pixels = attack.poisoned_train_pixels(D, A, P.data.image_size)
pd.DataFrame([P.ssl.__dict__]).T.rename(columns={0: "value"})

# %% [markdown]
# ## How the CPU profile differs from the paper, and why
# The table below sets the paper's victim training (`params/paper.yaml`) beside this profile's params file.
# Why each knob moved:
# - **data and backbone**: one training must fit in under an hour on a two-core CPU, so the data are
#   CIFAR-10 and the ResNet-18 is narrower, with a strided stem (several times cheaper per image);
# - **training**: with SGD for the same short budget the backbone learned too little to carry a backdoor
#   (the study below); AdamW learns faster. Each row of that study is **one** SSL training, most of them on
#   an earlier attack (its params files, `02_study_params_*.yaml`, say which): they point the way, they do
#   not prove it;
# - **trigger**: at the paper's strength (one trigger of its share of the image on half the target class)
#   the backdoor is far too weak a signal at this budget, so the profile pastes a larger share on every
#   target image (the study, and the feasibility probes);
# - **crops**: a larger minimum crop should keep the trigger in both views more often (a hypothesis: the first exercise
#   measures it; the study's crop rows do not settle it);
# - **precision**: bf16 trains faster on this CPU (`avx512_bf16`); whether it plants as strong a backdoor as
#   fp32 is measured in `figures/cifar10/02_precision_fp32_vs_bf16.md`, and the profile's choice is in its
#   `compute` section (bf16 inference gives the same flip-test scores).
#
# The study below measures what each knob does, against the goal its table prints.

# %% tags=["remove-input"]
notebook.show_markdown(notebook.training_settings(P, tuple(D.train.pixels.shape)))

# %% tags=["remove-input"]
precision_csv = notebook.figure_path(P.profile, "02_precision_fp32_vs_bf16.csv")  # helpers.studies.precision
if precision_csv.is_file():
    q = pd.read_csv(precision_csv).set_index("quantity")
    asr_row, top20 = q.loc["poisoned: probe ASR 10% labels (%)"], q.loc["PatchSearch: top-20 acc (%)"]
    minutes = q.loc["poisoned: SSL training (min)"]
    notebook.show_markdown(
        f"**What bf16 costs the attack.** The precision study (`02_precision_fp32_vs_bf16.md`) trains in "
        f"{minutes['bf16']:.0f} min in bf16 against {minutes['fp32']:.0f} min in fp32. On its first SSL seed the "
        f"backdoored model's probe ASR is {asr_row['bf16']:.1f}% in bf16 against {asr_row['fp32']:.1f}% in fp32 "
        f"(probe-seed spread {asr_row['probe seed spread (std)']:.1f} points), and PatchSearch's top-20 "
        f"{top20['bf16']:.0f}% against {top20['fp32']:.0f}%; whether that is the precision or the seed, the "
        "other seeds below say."
    )
    import yaml

    study = yaml.safe_load(notebook.figure_path(P.profile, "02_precision_params_ssl-seed1.yaml").read_text())
    now = P.to_dict()
    moved = [  # the settings of the attack and the training that differ between the study and the profile now
        f"`{section}.{key}` {study[section][key]!r} then, {value!r} now"
        for section in ("attack", "ssl")
        for key, value in now[section].items()
        if key != "seed" and key in study[section] and study[section][key] != value
    ]
    seeds_csv = notebook.figure_path(P.profile, "02_precision_training_seeds.csv")
    seed_lines = ""
    if seeds_csv.is_file():
        by_seed = pd.read_csv(seeds_csv).pivot(
            index="SSL training seed", columns="SSL pre-training precision", values="probe ASR 10% (%)"
        )
        precision_gap = (by_seed["fp32"] - by_seed["bf16"]).abs()  # per SSL seed
        seed_gap = (by_seed.max() - by_seed.min()).abs()  # per precision, over the seeds
        seed_lines = (
            "Over SSL training seeds (`02_precision_training_seeds.md`): "
            + "; ".join(f"seed {i}: fp32 {r['fp32']:.1f}%, bf16 {r['bf16']:.1f}%" for i, r in by_seed.iterrows())
            + f". The precisions differ by {', '.join(f'{g:.1f}' for g in precision_gap)} points (per seed), the "
            f"seeds by {', '.join(f'{g:.1f}' for g in seed_gap)} points (per precision): "
            + (
                "the SSL seed moves the ASR as much as the precision does, so these seeds do not say what bf16 "
                "costs the attack."
                if precision_gap.max() <= seed_gap.max()
                else "the precision moves the ASR more than the seed does."
            )
        )
    notebook.show_markdown(
        (
            "The study ran on an earlier setting of the profile ("
            + "; ".join(moved)
            + "): its numbers are not the current models' (notebook 07 measures those). "
            if moved
            else ""
        )
        + seed_lines
    )

# %% [markdown]
# ## Two views per image
# The MoCo-v2 augmentations (random resized crop, flip, colour jitter, grayscale, optional blur) are
# drawn per sample but applied to the whole batch at once on the training device. Each column shows a
# poisoned image and two of its views: the trigger survives most crops (`ssl.crop_min_scale`).

# %%
aug = augment.BatchAugment(ssl.augment_config(P.ssl, D.train.pixels.shape[-1]))
g = torch.Generator().manual_seed(0)
sample = poisoned_pixels[A.poison_idx[:8]]
views = [aug(sample, g), aug(sample, g)]
mean, std = torch.tensor(aug.config.mean)[:, None, None], torch.tensor(aug.config.std)[:, None, None]
to_uint8 = lambda v: (v * std + mean).clamp(0, 1).mul(255).byte().numpy()  # noqa: E731
fig = plotting.show_images(
    np.concatenate([sample.numpy(), to_uint8(views[0]), to_uint8(views[1])]),
    titles=["poisoned"] * 8 + ["view 1"] * 8 + ["view 2"] * 8,
    ncols=8,
)
plotting.savefig(fig, P.profile, NB, "views", dpi=P.figures.dpi)

# %% [markdown]
# ## Training
# One clean and one backdoored model, same seed and settings. Each epoch is checkpointed atomically; an
# interrupted run resumes where it stopped. Finished models are cached: a rerun loads them. The minutes and
# images/s below are wall-clock on the CPU that trained them: where other jobs shared it, the same work
# reads slower (compare the two models' images/s).

# %%
model_dirs = {variant: ssl.train_stage(P, variant) for variant in ("clean", "poisoned")}
histories = {v: pd.read_csv(d / "history.csv") for v, d in model_dirs.items()}
fig, ax = plt.subplots(figsize=(5, 3.2))
for variant, h in histories.items():
    ax.plot(h["epoch"], h["loss"], marker="o", ms=3, label=f"{variant} ({h['seconds'].sum() / 60:.1f} min)")
ax.set(xlabel="epoch", ylabel=f"{P.ssl.method} loss", title="SSL training loss")
ax.legend()
plotting.savefig(fig, P.profile, NB, "loss", dpi=P.figures.dpi)
pd.DataFrame(
    {
        v: {
            "epochs": len(h),
            "minutes": h["seconds"].sum() / 60,
            "images/s": h["images_per_s"].mean(),
            "final loss": h["loss"].iloc[-1],
        }
        for v, h in histories.items()
    }
)

# %% [markdown]
# ### One MoCo-v2 step, written out
# The loss of the equations above, image by image, and the momentum update, parameter by parameter. The
# stage computes the loss for the whole batch at once (`ssl.MoCoV2`); the cell after compares the two on a
# random batch of unit vectors and on a small network (`tests/test_readable.py` checks them too).


# %% tags=["readable"]
def info_nce_readable(q, k, queue, temperature):
    """MoCo-v2's loss: each query's own key against every key of the queue, averaged over the batch."""
    losses = []
    for q_i, k_i in zip(q, k, strict=True):
        positive = torch.exp(q_i @ k_i / temperature)
        negatives = torch.exp(queue @ q_i / temperature).sum()
        losses.append(-torch.log(positive / (positive + negatives)))
    return torch.stack(losses).mean()


def momentum_update_readable(key_net, query_net, m):
    """The key network follows the query network: xi <- m xi + (1 - m) theta, parameter by parameter."""
    with torch.no_grad():
        for xi, theta in zip(key_net.parameters(), query_net.parameters(), strict=True):
            xi.copy_(m * xi + (1 - m) * theta)


# %%
g = torch.Generator().manual_seed(0)
q, k, queue = (torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1) for n in (8, 8, 64))
tiny = torch.nn.Linear(4, 4)
tiny.feature_dim = 4  # a stand-in backbone: the loss reads only the embeddings
moco = ssl.MoCoV2(tiny, dim=16, queue_size=64, temperature=P.ssl.temperature)
loss_gap = abs(float(info_nce_readable(q, k, queue, P.ssl.temperature) - moco._loss(q, k, queue)))
query, key = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
pairs = zip(key.parameters(), query.parameters(), strict=True)
expected = [P.ssl.momentum * xi.detach() + (1 - P.ssl.momentum) * th.detach() for xi, th in pairs]
momentum_update_readable(key, query, P.ssl.momentum)
step_gap = max(float((xi.detach() - e).abs().max()) for xi, e in zip(key.parameters(), expected, strict=True))
print(f"readable against the stage's loss: {loss_gap:.1e}; the momentum update: {step_gap:.1e}")

# %% [markdown]
# ## Where the poisons land in the backdoored model's feature space
# Features of every training image (the defender can compute these too). For teaching we colour them by
# the ground truth: poisoned, clean target category, other.

# %% tags=["hide-input"]
image_size = D.train.pixels.shape[-1]
cfg = ssl.augment_config(P.ssl, image_size)
backbone = ssl.load_backbone(P, model_dirs["poisoned"], image_size)
features = models.extract_features(
    backbone, poisoned_pixels, cfg.mean, cfg.std, P.eval.batch_size, progress=True, precision=notebook.live_precision(P)
)
is_poison = A.poison_mask(len(features))
is_target = (D.train.labels == A.target_index) & ~is_poison

x = torch.as_tensor(cluster.l2_normalise(features))
xy = (x - x.mean(0)) @ torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh[:2].T  # PCA, no random draw
xy = xy.numpy()
fig, ax = plt.subplots(figsize=(5, 4.5))
for mask, label, color in [
    (~is_poison & ~is_target, "other", "0.75"),
    (is_target, f"clean {A.target_class}", "C0"),
    (is_poison, "poisoned", "C3"),
]:
    if not mask.any():  # e.g. no clean image of the target category where every one is poisoned
        continue
    ax.scatter(*xy[mask].T, s=3, c=color, label=f"{label} ({mask.sum()})", alpha=0.6, linewidths=0)
ax.set(title="backdoored model: PCA of normalised features", xticks=[], yticks=[])
ax.legend(markerscale=4, fontsize=8)
plotting.savefig(fig, P.profile, NB, "embedding", dpi=P.figures.dpi)

# %% [markdown]
# **Nearest neighbours of poisoned images.** If the trigger became a feature, a poisoned image's
# neighbours are other poisoned images, whatever they show. Where every image of the target category is
# poisoned (this profile), this figure cannot tell "poisons" from "the target category": the clean model's
# baseline after it does.

# %%
k = 7
queries = A.poison_idx[np.random.default_rng(0).choice(len(A.poison_idx), 4, replace=False)]
sims = x[queries] @ x.T
sims[torch.arange(len(queries)), torch.as_tensor(queries)] = -2  # not itself
neighbours = sims.topk(k, dim=1).indices.numpy()
rows = np.concatenate([queries[:, None], neighbours], axis=1)
titles = [
    ("query" if j == 0 else ("poison" if is_poison[i] else D.train.classes[D.train.labels[i]]))
    for row in rows
    for j, i in enumerate(row)
]
fig = plotting.show_images(poisoned_pixels[rows.ravel()].numpy(), titles=titles, ncols=k + 1)
plotting.savefig(fig, P.profile, NB, "neighbours", dpi=P.figures.dpi)

# %% [markdown]
# **Against what baseline?** Where every image of the target class carries the trigger
# (`attack.poison_rate: 1`, the default profile), "the poisons group together" could only mean "the
# target class groups together". The clean model never saw the trigger: the same measures on its features
# of the same patched images are the baseline. For each model: the share of poisons among a poison's nearest
# neighbours (`k = 7`), and, with k-means at one cluster per `100` images (what PatchSearch and PoisonCAM
# start from), the share of poisons in clusters at least half poisoned.


# %% tags=["hide-input"]
def grouping(features: np.ndarray, is_poison: np.ndarray, k: int = 7) -> dict:
    """How much the poisons group together in these features (ground truth: for teaching only)."""
    x = torch.as_tensor(cluster.l2_normalise(features))
    nearest = (x[is_poison] @ x.T).topk(k + 1, dim=1).indices[:, 1:].numpy()  # the first is the image itself
    clustering = cluster.kmeans(features, max(2, len(features) // 100), seed=0)
    return {
        f"poisons among a poison's {k} neighbours": float(is_poison[nearest].mean()),
        **cluster.poison_concentration(clustering.assignment, is_poison),
    }


clean_features = models.extract_features(
    ssl.load_backbone(P, model_dirs["clean"], image_size),
    poisoned_pixels,
    cfg.mean,
    cfg.std,
    P.eval.batch_size,
    precision=notebook.live_precision(P),
)
concentration = pd.DataFrame(
    {"backdoored model": grouping(features, is_poison), "clean model (baseline)": grouping(clean_features, is_poison)}
).T
concentration.insert(0, "poisons in the data", is_poison.mean())
plotting.save_table(concentration.reset_index(names="features of"), P.profile, NB, "poison_concentration")
nn_col, rich_col = "poisons among a poison's 7 neighbours", "poison_share_in_rich_clusters"
b, c = concentration.loc["backdoored model"], concentration.loc["clean model (baseline)"]
near = concentration[nn_col]  # per model
grouped_by_trigger = b[nn_col] - c[nn_col] >= 0.5 * (1 - c[nn_col])  # more than half the clean model's gap closed
notebook.show_markdown(
    f"Poisons are {is_poison.mean():.1%} of the data. Among a poison's 7 nearest neighbours: "
    f"{b[nn_col]:.1%} poisons in the backdoored model, {c[nn_col]:.1%} in the clean one. In clusters at least "
    f"half poisoned: {b[rich_col]:.1%} of the poisons (backdoored) against {c[rich_col]:.1%} (clean). "
    + (
        "The clean model groups these images almost as tightly: most of the grouping is the class, not the trigger."
        if not grouped_by_trigger
        else "The backdoored model closes more than half of the gap the clean model leaves: the trigger, "
        "not only the class, holds the poisons together."
    )
)
concentration

# %% [markdown]
# ## The CPU-scale study: when does the backdoor take?
# The paper trains ResNet-18 for hundreds of epochs on a hundred thousand large images. On this two-core CPU
# one training has under an hour (the cost line at the top). `python -m helpers.studies.strength` trains clean and backdoored models for a grid
# of settings (method, stem stride, trigger size, crop scale, poison rate) and evaluates them every few
# epochs; `python -m helpers.studies.strength --publish` copies the rows to `figures/<profile>/02_study_*.csv`. The
# goal, part by part (`evaluate.goal_checks`), is printed with the table.

# %% tags=["hide-input"]
from helpers import paths

study_csv = paths.published_dir(P.profile) / "02_study_curves.csv"
if study_csv.is_file():
    curves = pd.read_csv(study_csv)
    # Rows marked "poisoned (superseded)" came from a first evaluator that fitted kNN on the poisoned
    # training images, which inflates ASR: their accuracy and cluster columns stand, their ASRs (kNN and probe,
    # both fitted on those labels) do not, so the ASR panel leaves them out.
    curves.loc[curves["labelled_set"] != "clean", ["knn_asr", "probe10_asr"]] = np.nan
    long = curves.assign(
        ASR=100 * curves["probe10_asr"],
        accuracy=100 * curves["probe10_acc"],
        rich=100 * curves["poison_share_in_rich_clusters"],
        model=curves["variant"].map({"poisoned": "backdoored", "clean": "clean"}),
    )
    fig, grid = plt.subplots(2, 2, figsize=(10, 6.4), sharex=True)  # three panels and the legend
    axes = grid.flat[:3]
    panels = (
        ("ASR", "10%-label probe ASR, patched data (%)"),
        ("accuracy", "10%-label probe accuracy, clean data (%)"),
        ("rich", "poisons in >= 50%-poisoned clusters (%)"),
    )
    for k, (ax, (column, label)) in enumerate(zip(axes, panels, strict=True)):
        data_ = long if column != "rich" else long[long["model"] == "backdoored"]  # a clean set has no poisons
        sns.lineplot(
            data_, x="epoch", y=column, hue="run", style="model", marker="o", errorbar=None, ax=ax, legend=k == 0
        )
        ax.set(xlabel="SSL training epoch", ylabel=label)
    axes[0].axhline(20, color="k", lw=0.8, ls="--")  # the goal's 20%
    handles, labels = axes[0].get_legend_handles_labels()
    axes[0].get_legend().remove()
    grid.flat[3].axis("off")
    grid.flat[3].legend(handles, labels, loc="center", fontsize=8, frameon=False)
    fig.tight_layout()
    plotting.savefig(fig, P.profile, NB, "study_curves", dpi=P.figures.dpi)
    runs = pd.read_csv(paths.published_dir(P.profile) / "02_study_runs.csv")
    lines = []
    for _, r in runs.iterrows():  # why each run met or missed the study's goal (helpers.studies.strength.publish)
        checks = evaluate.goal_checks(  # the table holds %, the goal fractions
            *(r[c] / 100 for c in ("probe10 ASR", "probe10 ASR clean model", "probe10 acc", "probe10 acc clean model")),
            r["poisons in rich clusters (%)"] / 100,
        )
        missed = [c for c, ok in checks.items() if not ok]
        lines.append(
            f"- `{r['run']}` (epoch {r['epochs']}; ASR {r['probe10 ASR']:.1f}% vs {r['probe10 ASR clean model']:.1f}%, "
            f"accuracy {r['probe10 acc']:.1f}% vs {r['probe10 acc clean model']:.1f}%, "
            f"{r['poisons in rich clusters (%)']:.0f}% of poisons in rich clusters): goal "
            + ("met." if not missed else "missed: " + "; ".join(missed) + ".")
        )
    goal = "; ".join(evaluate.goal_checks(0, 0, 0, 0, 0))  # its parts, in words
    notebook.show_markdown(
        f"**The study's goal**, every part: {goal}. It is stricter than the project's later rule for a planted "
        f"backdoor ({evaluate.planted_rule()}, notebook 07), so a run below can miss it and still plant a "
        "backdoor by that rule; these runs were measured when the study made them (`02_study_runs.md`), and notebook "
        "07 measures the profile's models again with the current evaluation.\n\n" + "\n".join(lines)
    )
    notebook.show_table(runs.drop(columns="overrides"), keys=["run"])  # the overrides: 02_study_params_*.yaml
else:
    print(f"no study results for profile {P.profile} (run `python -m helpers.studies.strength` to make them)")

# %% [markdown]
# ## One configuration is not evidence: the settings across (target, trigger) pairs
# A setting counts only if it plants a backdoor for several targets and triggers, with the triggers
# spread over the image (a fixed window at the centre must not find them). `python -m helpers.studies.strength
# --publish <profile> --pairs` tabulates every setting of `helpers.studies.strength.SETTINGS` on the pairs of
# `helpers.studies.strength.PAIRS`: the goal is the planted rule of notebook 07 (`evaluate.backdoor_planted`,
# printed below; the clean model measured with the same pair's trigger) in every pair. Settings whose curve showed no backdoor
# were stopped early; their last evaluated epoch is in the table.

# %% tags=["hide-input"]
pairs_csv = paths.published_dir(P.profile) / "02_study_pairs.csv"
if pairs_csv.is_file():
    pairs = pd.read_csv(pairs_csv)
    lines = []
    for setting, t in pairs.groupby("setting", sort=False):
        met = int(t["goal met"].sum())
        asr = ", ".join(
            f"{r['target']}/{r['trigger seed']}: {r['probe10 ASR']:.1f}% vs {r['probe10 ASR clean model']:.1f}%"
            for _, r in t.iterrows()
        )
        lines.append(f"- `{setting}` (epoch {t['epochs'].max()}): goal met on {met} of {len(t)} pairs ({asr}).")
    import yaml

    from helpers import cache

    now = P.to_dict()

    def is_profile(setting):  # its params on the profile's own pair have the profile's attack and training
        f = notebook.figure_path(P.profile, f"02_study_params_{setting}_{A.target_class}-{P.attack.trigger_seed}.yaml")
        study = yaml.safe_load(f.read_text()) if f.is_file() else None
        return study is not None and all(
            study.get(sec, {}).get(k) == v for sec in ("attack", "ssl") for k, v in now[sec].items()
        )

    own = [setting for setting in pairs["setting"].unique() if is_profile(setting)]
    if own:
        t = pairs[pairs["setting"] == own[0]]
        mine = t[(t["target"] == A.target_class) & (t["trigger seed"] == P.attack.trigger_seed)].iloc[0]
        top = max(P.eval.label_fractions)

        def cached_asr(run) -> dict:  # % ASR of the backdoored and clean models of one SSL training (read only)
            out = {}
            for v in ("poisoned", "clean"):
                r = cache.cached_result(f"eval_{v}", run)
                if r is not None:
                    probe = pd.read_csv(r.path / "probe.csv")
                    out[v] = 100 * probe[np.isclose(probe["labels"], top)]["asr"].mean()
            return out

        now_asr = cached_asr(P)
        # the same attack, other SSL seeds (notebook 07's "Table 2 over SSL training seeds")
        seed_asr = [cached_asr(params.with_variant(P, v)) for v in ("ssl_seed1", "ssl_seed2") if v in P.variants]
        seed_asr = [now_asr, *seed_asr] if len(now_asr) == 2 else []
        seed_asr = [a for a in seed_asr if len(a) == 2]
        planted = [evaluate.backdoor_planted(a["poisoned"] / 100, a["clean"] / 100) for a in seed_asr]
        lines.append(
            f"\n**The profile's own setting** is `{own[0]}`: it meets the goal on {int(t['goal met'].sum())} of "
            f"{len(t)} pairs"
            + (", so the study does not show that it plants a backdoor" if t["goal met"].sum() < len(t) else "")
            + f". On the profile's pair the study "
            f"measured {mine['probe10 ASR']:.1f}% against {mine['probe10 ASR clean model']:.1f}% with its own "
            "evaluation when it ran"
            + (
                f"; notebook 07 measures the profile's models with the current one: {now_asr['poisoned']:.1f}% "
                f"against {now_asr['clean']:.1f}% ({now_asr['poisoned'] / now_asr['clean']:.1f}x), "
                + ("a backdoor" if planted[0] else "**not** a backdoor")
                + " by that rule"
                + (
                    f"; over {len(planted)} SSL training seeds of the same setting, {sum(planted)} plant one ("
                    + ", ".join(f"{a['poisoned']:.1f}% against {a['clean']:.1f}%" for a in seed_asr)
                    + ")"
                    if len(planted) > 1
                    else ""
                )
                + ". The next notebooks study the model of the first seed. "
                + (
                    f"Its trigger holds the poisons together in the feature space ({near['backdoored model']:.1%} "
                    f"of a poison's neighbours are poisons, against {near['clean model (baseline)']:.1%} in the "
                    "clean model: the baseline above) "
                    "while the linear probe is fooled too little to count: the defenses read the feature space, "
                    "so they can find the poisons of an attack that barely works downstream."
                    if grouped_by_trigger and not planted[0]
                    else ""
                )
                if len(now_asr) == 2
                else "."
            )
        )
    notebook.show_markdown(f"**The goal** in every pair: {evaluate.planted_rule()}.\n\n" + "\n".join(lines))
    notebook.show_table(pairs, keys=["setting", "target", "trigger seed"])
    from IPython.display import Image

    display(Image(filename=str(pairs_csv.with_suffix(".png"))))  # noqa: F821
else:
    print(f"no pairs study for profile {P.profile} (python -m helpers.studies.strength --publish {P.profile} --pairs)")

# %% [markdown]
# ## Exercises
# Training a model takes a while here (the cost line at the top), so these use what is cached.
#
# 1. **Two views, one trigger.** In the views figure, count how often both views of a poisoned image
#    still carry a whole trigger. Predict how `ssl.crop_min_scale` (the profile's against the paper's, in the
#    settings table) changes that count, then measure it on a few hundred poisoned images with
#    `helpers.augment` (no training needed).
# 2. **Read the study.** From the goal lines above, which setting comes closest to the goal (ASR ratio,
#    poisons in rich clusters), and which part of the goal does it miss? What would you change first with
#    twice the compute?
# 3. **Neighbours.** Pick a patched validation image of a non-target class and list its `k = 10` nearest
#    training images in the clean and in the backdoored model (the neighbours cell shows how). How many
#    are poisons in each? Then average over a few hundred such images (`attack.patched_val_pixels`): one
#    image is noise.
