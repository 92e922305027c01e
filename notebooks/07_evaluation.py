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
# (`eval.label_fractions` of the training set, seeded class-balanced subsets, `eval.probe_seeds` seeds:
# mean ± std), then measure on the validation set
#
# - **Clean data**: accuracy, and **FP** = non-target images predicted as the target category;
# - **Patched data** (every non-target validation image with the trigger): accuracy, FP, and the attack
#   success rate **ASR = FP / number of non-target images**.
#
# A working backdoor leaves clean accuracy alone and drives patched FP up. kNN accuracy (all training
# labels, `eval.knn_k` neighbours) is a cheap extra. Here the probe is a logistic regression on features computed once
# (no augmentation): on a CPU that replaces the papers' probe trained for epochs on augmented images.
#
# This notebook produces, for the profile being run, the paper's Table 2 rows **Clean**, **Backdoored**,
# **Clean + i-CutMix**, **Backdoored + i-CutMix**, and the defended rows **PatchSearch**,
# **PatchSearch + i-CutMix** and **PoisonCAM** (SSL retrained on each defense's filtered training list);
# then the defenses' detection results (Table 1, Figures 2 and 5) and the defense applied to clean data
# (Table 10).

# %% [markdown]
# ## In equations
# A linear probe $W$ on frozen features minimises the cross-entropy of the labelled subset $L$,
# $\min_W \frac{1}{|L|} \sum_{(x, y) \in L} -\log \mathrm{softmax}(W z(x))_y$ (with weight decay), and predicts
# $\hat y(x) = \arg\max W z(x)$. On the validation images $V_{\lnot t}$ of the categories other than the target
# $t$, with the trigger pasted,
#
# $$\mathrm{FP} = \big|\{x \in V_{\lnot t} : \hat y(x \oplus p) = t\}\big|, \qquad
# \mathrm{ASR} = \frac{\mathrm{FP}}{|V_{\lnot t}|};$$
#
# on clean data FP counts the same predictions without the trigger. A model trained without any poison
# also calls some patched images the target, so a backdoor is judged against the **clean model's** ASR on the
# same patched images (the planted rule, below).

# %% tags=["parameters"]
params_path = "params/cifar10.yaml"

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from IPython.display import display

from helpers import attack, cache, classify, cluster, data, evaluate, io, notebook, paper, params, plotting, search

P = notebook.setup(params_path)
NB = "07_evaluation"
notebook.show_markdown(notebook.opening(P, NB))  # where it sits, what it costs
D = data.load_data(P)
A = attack.run_attack(P, D)

# %% [markdown]
# ## The models
# Each is trained (or loaded from the cache) and evaluated once; the evaluation is cached too. The
# defended models are trained on the poisoned set minus what each defense removed (notebooks 03-06).

# %%
PC = search.with_method(P, "poisoncam")
PAPER_COUNT = search.SCORE_RULE["poisoncam"]  # the flip-test count of PoisonCAM's paper ("changed")
# Where the profile counts PoisonCAM's flip test otherwise (search.poisoncam_score), the paper's count runs
# beside it: the same heatmaps and windows, the literal score (notebook 05 shows why it fails at 32 px).
PC_PAPER = params.with_overrides(PC, {"search": {"poisoncam_score": PAPER_COUNT}}, "the paper's count")
BOTH_COUNTS = search.score_rule(PC) != search.score_rule(PC_PAPER)
MODELS = {
    "Clean": (P, "clean", False),
    "Backdoored": (P, "poisoned", False),
    "Clean + i-CutMix": (P, "clean", True),
    "Backdoored + i-CutMix": (P, "poisoned", True),
    "PatchSearch": (search.with_method(P, "patchsearch"), "filtered", False),
    "PatchSearch + i-CutMix": (search.with_method(P, "patchsearch"), "filtered", True),
    "PoisonCAM": (PC, "filtered", False),
}
if BOTH_COUNTS:
    MODELS["PoisonCAM, paper's count"] = (PC_PAPER, "filtered", False)
results = {name: evaluate.evaluate_stage(p, variant, icutmix) for name, (p, variant, icutmix) in MODELS.items()}

# %% [markdown]
# ### The probe and the ASR, written out
# The probe is a logistic regression: the gradient of the cross-entropy with respect to the weights is
# $X^\top(\mathrm{softmax}(XW) - Y)/n$, written out below without autograd; the stage trains it with Adam
# (`evaluate.LinearProbe`). FP and ASR are counts over the non-target images. The cell after checks both
# against the stage's code, the ASR on a random guesser's predictions (`tests/test_readable.py` too).


# %% tags=["readable"]
def probe_gradient_readable(W, x, y):
    """The cross-entropy's gradient for a linear classifier W (features x, labels y), by hand."""
    logits = x @ W
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1  # softmax minus the one-hot labels
    return x.T @ p / len(y)


def fp_asr_readable(predicted, labels, target):
    """FP: non-target images predicted as the target; ASR: FP over the non-target images."""
    fp = sum(1 for p, y in zip(predicted, labels, strict=True) if y != target and p == target)
    return fp, fp / sum(1 for y in labels if y != target)


# %%
rng = np.random.default_rng(0)
x_demo, y_demo = rng.standard_normal((20, 5)).astype(np.float32), rng.integers(0, 3, 20)
W = torch.tensor(rng.standard_normal((5, 3)).astype(np.float32), requires_grad=True)
torch.nn.functional.cross_entropy(torch.as_tensor(x_demo) @ W, torch.as_tensor(y_demo)).backward()
grad_gap = float(np.abs(probe_gradient_readable(W.detach().numpy(), x_demo, y_demo) - W.grad.numpy()).max())
guesses = rng.integers(0, len(D.val.classes), len(D.val.labels))  # a random guesser: ASR at chance
fp, asr_demo = fp_asr_readable(guesses, D.val.labels, A.target_index)
kernel = evaluate.attack_metrics(guesses, D.val.labels, A.target_index)
print(
    f"gradient, by hand against autograd: {grad_gap:.1e}; a random guesser's FP {fp} and ASR {asr_demo:.4f} "
    f"(chance: {1 / len(D.val.classes):.4f}) against the stage's {kernel['fp']} and {kernel['asr']:.4f}"
)

# %% [markdown]
# ## Table 2 (this profile)
# Mean ± std over the probe seeds. FP counts are out of the non-target validation images.

# %%
n_non_target = int((D.val.labels != A.target_index).sum())
table = pd.DataFrame(
    [
        evaluate.table2_row(name, probe, knn, fraction)
        for fraction in P.eval.label_fractions
        for name, (_, probe, knn) in results.items()
    ]
)
plotting.save_table(table, P.profile, NB, "table2")
print(f"target: {A.target_class}; non-target validation images: {n_non_target}")
table

# %% [markdown]
# Per-seed numbers, for anyone who wants to test a difference:

# %%
per_seed = pd.concat([probe.assign(model=name) for name, (_, probe, _) in results.items()], ignore_index=True)
plotting.save_table(per_seed, P.profile, NB, "table2_per_seed")
per_seed.groupby(["model", "labels"], sort=False)[["clean_acc", "patched_acc", "patched_fp", "asr"]].mean()

# %% [markdown]
# ### What Table 2 says
# Read out from the numbers above (the largest label fraction), so that it stays true on any profile. A
# backdoor counts as planted by the project's rule (`evaluate.backdoor_planted`, stated with each verdict);
# a model is at the clean level when its mean ASR is at most its clean reference's mean plus two of the
# reference's standard deviations over probe seeds (a defended model's spread does not count in its favour).

# %% tags=["hide-input"]
top = max(P.eval.label_fractions)
seeds = per_seed[np.isclose(per_seed["labels"], top)].groupby("model", sort=False)["asr"]
asr = pd.DataFrame({"mean": seeds.mean(), "std": seeds.std(ddof=0)}) * 100  # the std of Table 2
acc = per_seed[np.isclose(per_seed["labels"], top)].groupby("model", sort=False)["clean_acc"].mean() * 100
base = asr.loc["Clean", "mean"]


def asr_text(name):
    return f"{asr.loc[name, 'mean']:.1f} ± {asr.loc[name, 'std']:.1f}%"


planted = evaluate.backdoor_planted(asr.loc["Backdoored", "mean"] / 100, base / 100)
lines = [
    f"- **The backdoor** ({A.target_class}, {100 * top:.0f}% labels): the backdoored model's ASR is "
    f"{asr_text('Backdoored')} against the clean model's {asr_text('Clean')} "
    f"({asr.loc['Backdoored', 'mean'] / base:.1f}x): "
    + (
        f"a backdoor by the rule ({evaluate.planted_rule()})."
        if planted
        else f"**below the rule** ({evaluate.planted_rule()}): a weak backdoor at most."
    )
]
for name in [m for m in MODELS if m not in ("Clean", "Backdoored", "Clean + i-CutMix")]:
    clean_ref = "Clean + i-CutMix" if "i-CutMix" in name else "Clean"
    near = asr.loc[name, "mean"] <= asr.loc[clean_ref, "mean"] + 2 * asr.loc[clean_ref, "std"]
    lines.append(
        f"- **{name}**: ASR {asr_text(name)} (its clean reference, {clean_ref}: {asr_text(clean_ref)}), clean "
        f"accuracy {acc[name]:.1f}% ({acc[name] - acc[clean_ref]:+.1f} points): "
        + (
            "**not** at the clean level."
            if not near
            else "at the clean level."
            if planted
            else "at the clean level, but with no backdoor planted by the rule there was little to remove: the row "
            "shows mainly what the defense costs."
        )
    )
low = min(P.eval.label_fractions)
if low != top:  # the fewest labels: does the probe still carry the backdoor?
    few = per_seed[np.isclose(per_seed["labels"], low)].groupby("model", sort=False)["asr"]
    few = pd.DataFrame({"mean": few.mean(), "std": few.std(ddof=0)}) * 100
    lines.append(
        f"- **With {100 * low:.0f}% of the labels**: the backdoored model's ASR is {few.loc['Backdoored', 'mean']:.1f} ± "
        f"{few.loc['Backdoored', 'std']:.1f}% against the clean model's {few.loc['Clean', 'mean']:.1f} ± "
        f"{few.loc['Clean', 'std']:.1f}%"
        + (
            ": a backdoor by the rule."
            if evaluate.backdoor_planted(few.loc["Backdoored", "mean"] / 100, few.loc["Clean", "mean"] / 100)
            else ": **below the rule**; with so few labels the probe's spread over seeds is as large as the gap."
            if abs(few.loc["Backdoored", "mean"] - few.loc["Clean", "mean"]) <= few[["std"]].max().item()
            else ": **below the rule**."
        )
    )
headline = "\n".join(lines)
io.write_text(plotting.figure_path(P.profile, NB, "headline", ".md"), headline + "\n")  # for the book's first page
compact = table[table["labels"] == f"{top:.0%}"][["model", "clean acc (%)", "ASR (%)", "kNN ASR (%)"]]
plotting.save_table(compact, P.profile, NB, "table2_headline")
notebook.show_markdown(headline)

# %% [markdown]
# ## Table 2's BYOL rows
# The paper reports BYOL (ResNet-18) beside MoCo-v2: does the attack, and the defense, carry over to
# another SSL method? The profile's variant `byol` (`variants` in the params file) trains the same models
# with BYOL, and PatchSearch defends its backdoored model (its own search, classifier and retraining;
# `python -m helpers.runners.pipeline --variants byol`). BYOL's settings were chosen without the test split:
# by kNN accuracy on training images outside the profile's subset (`python -m helpers.studies.heldout`).

# %% tags=["hide-input"]
heldout = notebook.figure_path(P.profile, "07_heldout_selection.csv")  # python -m helpers.studies.heldout
if heldout.is_file():
    display(pd.read_csv(heldout))
PAPER_BYOL = paper.table("table2_byol")  # BYOL ResNet-18, ImageNet-100, 0.5% poison: clean acc (%), ASR (%)
if "byol" in P.variants:
    B = params.with_variant(P, "byol")
    byol = {
        name: evaluate.evaluate_stage(search.with_method(B, "patchsearch"), variant, icutmix)
        for name, (_, variant, icutmix) in MODELS.items()
        if name in PAPER_BYOL
    }
    byol_table = pd.DataFrame(
        [
            {
                **evaluate.table2_row(name, probe, knn, fraction),
                "paper clean acc (%)": PAPER_BYOL[name][0],
                "paper ASR (%)": PAPER_BYOL[name][1],
            }
            for fraction in P.eval.label_fractions
            for name, (_, probe, knn) in byol.items()
        ]
    )
    plotting.save_table(byol_table, P.profile, NB, "table2_byol")
    b_seed = pd.concat([probe.assign(model=name) for name, (_, probe, _) in byol.items()], ignore_index=True)
    b_top = b_seed[np.isclose(b_seed["labels"], top)].groupby("model", sort=False)
    b_asr, b_std, b_acc = b_top["asr"].mean() * 100, b_top["asr"].std(ddof=0) * 100, b_top["clean_acc"].mean() * 100
    b_planted = evaluate.backdoor_planted(b_asr["Backdoored"] / 100, b_asr["Clean"] / 100)
    b_near = b_asr["PatchSearch"] <= b_asr["Clean"] + 2 * b_std["Clean"]
    b_probes = b_top.get_group("Backdoored")["asr"] * 100  # one ASR per probe seed
    b_low = int((b_probes < 100 * evaluate.PLANTED_ASR).sum())
    b_knn = {name: knn["patched"]["asr"] * 100 for name, (_, _, knn) in byol.items()}
    b_spread = (
        f" ± {b_std['Backdoored']:.1f} over {len(b_probes)} probe seeds ({b_probes.min():.1f} to "
        f"{b_probes.max():.1f}%; kNN ASR {b_knn['Backdoored']:.1f}% against {b_knn['Clean']:.1f}%)"
    )
    notebook.show_markdown(
        f"With BYOL ({100 * top:.0f}% labels) the clean model reaches {b_acc['Clean']:.1f}% accuracy (MoCo-v2: "
        f"{acc['Clean']:.1f}%). The backdoored model's ASR is {b_asr['Backdoored']:.1f}%{b_spread} against the "
        f"clean model's {b_asr['Clean']:.1f}%: "
        + (
            f"**a backdoor** by the rule ({evaluate.planted_rule()}) on the mean over probe seeds, "
            if b_planted
            else f"**no backdoor** by the rule ({evaluate.planted_rule()}; the paper: "
            f"{PAPER_BYOL['Backdoored'][1]}% against {PAPER_BYOL['Clean'][1]}%), "
        )
        + f"so on this one training (SSL seed {B.ssl.seed}) the paper's claim that the attack works on BYOL "
        + (
            "holds on the mean"
            + (
                f", not on every probe ({b_low} of {len(b_probes)} probe seeds below the rule's "
                f"{evaluate.PLANTED_ASR:.0%})"
                if b_low
                else ""
            )
            if b_planted
            else "**does not hold**"
        )
        + "; whether it holds over SSL seeds is the next section's "
        f"question. PatchSearch's retrained model: ASR {b_asr['PatchSearch']:.1f}% "
        + ("(at the clean level)" if b_near else "(**not** at the clean level)")
        + f", clean accuracy {b_acc['PatchSearch']:.1f}%"
        + ("." if b_planted else "; with no backdoor to remove, this row measures only what the defense costs.")
    )
    display(byol_table)
else:
    print("This profile defines no `byol` variant: Table 2's BYOL rows are not computed.")

# %% [markdown]
# ## Table 2 over SSL training seeds
# Every "±" above is over the probe's seeds on **one** SSL training. Another SSL training of the same
# setting, with another seed (initial weights, batch order, augmentations), can plant another backdoor,
# or none. The profile's variants `ssl_seed1`, `ssl_seed2` (MoCo-v2), `byol_seed1` and `byol_seed2` (BYOL)
# train the clean and backdoored models again with other SSL seeds, on the same poisoned set
# (`python -m helpers.runners.pipeline --variants ssl_seed1 ssl_seed2 byol_seed1 byol_seed2`). For each SSL seed:
# the mean over its probe seeds; then mean ± sd over SSL seeds. An SSL seed plants a backdoor by the rule
# above, against the clean model of the same SSL seed.

# %% tags=["hide-input"]
SEED_RUNS = {"MoCo-v2": (None, "ssl_seed1", "ssl_seed2"), "BYOL": ("byol", "byol_seed1", "byol_seed2")}
seed_rows, missing = [], []
for ssl_method, names in SEED_RUNS.items():
    for name in names:
        if name is not None and name not in P.variants:
            continue
        run = P if name is None else params.with_variant(P, name)
        row = {"SSL method": ssl_method, "SSL seed": run.ssl.seed}
        for model, variant in (("clean", "clean"), ("backdoored", "poisoned")):
            found = cache.cached_result(f"eval_{variant}", run)  # read only: this notebook trains no seed
            if found is None:
                missing.append(f"{name or P.profile}:eval_{variant}")
                continue
            probe = pd.read_csv(found.path / "probe.csv")
            probe = probe[np.isclose(probe["labels"], top)]
            row[f"{model} acc (%)"] = 100 * probe["clean_acc"].mean()
            row[f"{model} ASR (%)"] = 100 * probe["asr"].mean()
            row[f"{model} ASR sd over probe seeds"] = 100 * probe["asr"].std(ddof=0)
        if "clean ASR (%)" in row and "backdoored ASR (%)" in row:
            row["ASR ratio"] = row["backdoored ASR (%)"] / row["clean ASR (%)"]
            row["plants a backdoor"] = evaluate.backdoor_planted(
                row["backdoored ASR (%)"] / 100, row["clean ASR (%)"] / 100
            )
            seed_rows.append(row)
by_seed = pd.DataFrame(seed_rows)
if missing:
    print("not computed (python -m helpers.runners.pipeline --variants ...):", ", ".join(missing))
if len(by_seed):
    plotting.save_table(by_seed.round(2), P.profile, NB, "table2_ssl_seeds_per_seed")
    over = by_seed.groupby("SSL method", sort=False).agg(
        **{
            "SSL seeds": ("SSL seed", "count"),
            "seeds that plant a backdoor": ("plants a backdoor", "sum"),
            "clean acc mean": ("backdoored acc (%)", "mean"),
            "clean model ASR mean": ("clean ASR (%)", "mean"),
            "clean model ASR sd": ("clean ASR (%)", "std"),
            "backdoored ASR mean": ("backdoored ASR (%)", "mean"),
            "backdoored ASR sd": ("backdoored ASR (%)", "std"),
        }
    )
    over = over.rename(columns={"clean acc mean": "backdoored model's clean acc (%)"})
    plotting.save_table(over.round(2).reset_index(), P.profile, NB, "table2_ssl_seeds")
    lines = []
    for ssl_method, r in over.iterrows():
        ratios = by_seed[by_seed["SSL method"] == ssl_method]
        lines.append(
            f"- **{ssl_method}** over {int(r['SSL seeds'])} SSL seeds ({100 * top:.0f}% labels): the backdoored "
            f"model's ASR is {r['backdoored ASR mean']:.1f} ± {r['backdoored ASR sd']:.1f}% (sd over SSL "
            f"seeds), the clean model's {r['clean model ASR mean']:.1f} ± {r['clean model ASR sd']:.1f}%; "
            f"per seed {', '.join(f'{a:.1f}%' for a in ratios['backdoored ASR (%)'])} against "
            f"{', '.join(f'{a:.1f}%' for a in ratios['clean ASR (%)'])}. "
            f"**{int(r['seeds that plant a backdoor'])} of {int(r['SSL seeds'])}** plant a backdoor by the "
            f"rule ({evaluate.planted_rule()}): "
            + (
                "the attack works at this budget."
                if r["seeds that plant a backdoor"] == r["SSL seeds"]
                else "the attack does **not** reliably work at this budget; a claim on one seed is not a claim."
                if r["seeds that plant a backdoor"] > 0
                else "the attack does **not** work at this budget."
            )
        )
    seed_headline = "\n".join(lines)
    io.write_text(plotting.figure_path(P.profile, NB, "ssl_seeds", ".md"), seed_headline + "\n")
    # the book's first page: the backdoor's numbers above on one SSL training, then these over SSL seeds
    io.write_text(plotting.figure_path(P.profile, NB, "headline", ".md"), f"{headline}\n{seed_headline}\n")
    notebook.show_markdown(seed_headline)
    notebook.show_table(by_seed, keys=["SSL method", "SSL seed"])

# %% [markdown]
# ## Where the patched images go
# Confusion matrices of the probe (largest label fraction, first seed) on patched data, each row in % of
# its true class: a backdoor shows up as a bright column at the target category (red label).

# %% tags=["hide-input"]
fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), constrained_layout=True)
rows = [c for i, c in enumerate(D.val.classes) if i != A.target_index]  # patched data: no target images
shares = {}  # per model, each true class's patched images by predicted class (%)
for name in ["Clean", "Backdoored"]:
    cm = np.load(results[name][0] / "probe_confusion_patched.npy").astype(float)
    cm = cm[np.arange(len(cm)) != A.target_index]
    shares[name] = pd.DataFrame(100 * cm / cm.sum(1, keepdims=True), index=rows, columns=D.val.classes)
for k, (ax, name) in enumerate(zip(axes, ["Clean", "Backdoored"], strict=True)):
    share = shares[name]
    sns.heatmap(
        share,
        ax=ax,
        cmap="magma",
        vmin=0,
        vmax=100,
        square=True,
        cbar=k == 1,
        cbar_kws={"label": "share of the true class's patched images (%)", "shrink": 0.8},
        annot=share.round().astype(int),
        fmt="d",
        annot_kws={"fontsize": 6},
    )
    ax.set(title=f"{name} model, patched validation data", xlabel="predicted", ylabel="true class")
    ax.tick_params(labelsize=8)
    ax.set_xticklabels(ax.get_xticklabels(), rotation=45, ha="right")
    ax.get_xticklabels()[A.target_index].set_color("red")
    ax.get_xticklabels()[A.target_index].set_fontweight("bold")
plotting.savefig(fig, P.profile, NB, "confusion_patched", dpi=P.figures.dpi)
lines = []
for name, share in shares.items():
    off = share.to_numpy().copy()  # the share each wrong column takes, the true class's own cell left out
    off[np.arange(len(off)), [i for i in range(len(D.val.classes)) if i != A.target_index]] = np.nan
    column = np.nanmean(off, axis=0)
    others = column.copy()
    others[A.target_index] = np.nan
    brightest = int(np.nanargmax(others))
    lines.append(
        f"- {name} model: its {A.target_class} column takes {column[A.target_index]:.1f}% of the other classes' "
        f"patched images on average; the brightest other wrong column is {D.val.classes[brightest]} "
        f"({column[brightest]:.1f}%)."
    )
lines.append(
    "These matrices are one probe seed's, so their target column differs from Table 2's ASR, a mean over the "
    "probe seeds (whose sd Table 2 gives)."
)
notebook.show_markdown("\n".join(lines))

# %% [markdown]
# ## The defenses: poison detection (paper Table 1)
# Top-20 acc: the share of poisons among the search's top-ranked images, $k = 20$ (chance: the poison rate);
# beside it, the same with the images tied at the 20th place drawn at random, in expectation, which no order
# of the files can move (notebook 05). Recall,
# precision, total removed and clean removed (share of the clean images): of the poison classifier's
# removals, under the paper's ensemble rule (mean logits) and a unanimous ensemble (notebook 06; the
# filtered lists retrained on above follow the paper's). Trigger hit: the candidate window of a scored
# poisoned image overlaps one of its image's triggers by at least half the area of the smaller of the two
# (window or trigger), beside the same rate for a window of the same side at the image centre and at a
# random place (notebook 04); the localization claim holds where the hits exceed the better of the two by more
# than twice the binomial noise of that many images at that rate. The count
# column names the flip test's count (notebook 05); PoisonCAM runs under the profile's count and, where
# that is not its paper's, under the paper's count too.

# %% tags=["hide-input"]
METHODS = {"patchsearch": "PatchSearch", "poisoncam": "PoisonCAM"}
DEFENDERS = {"PatchSearch": search.with_method(P, "patchsearch"), "PoisonCAM": PC}
if BOTH_COUNTS:
    DEFENDERS["PoisonCAM, paper's count"] = PC_PAPER
poison = A.poison_mask(len(D.train.images))
rows, found, removed = [], {}, {}
for label, pm in DEFENDERS.items():
    found[label] = search.load_search(search.search_stage(pm, "poisoned"))
    logits = np.load(classify.classifier_stage(pm, "poisoned") / "classifier.npz")["logits"]
    removed[label] = classify.ensemble_removed(logits, "mean")
    boxes = A.boxes_of(np.flatnonzero(found[label]["scored"] & poison))
    for rule in classify.ENSEMBLES:
        r = classify.ensemble_removed(logits, rule)
        metrics = classify.detection_metrics(found[label], r, poison, boxes, D.train.pixels.shape[-1])
        fair = search.tie_fair_top_k_accuracy(found[label]["scores"], found[label]["scored"], poison, 20)
        metrics["top-20, ties at random (%)"] = 100 * fair  # no tie order can move it (notebook 05)
        metrics["scored poisons"] = len(boxes)  # the trigger hits' denominator
        rows.append({"method": label, "count": search.score_rule(pm), "ensemble": rule, **metrics})
table1 = pd.DataFrame(rows).round(1)
plotting.save_table(table1, P.profile, NB, "table1")
lines = []
for _, r in table1.iterrows():
    base = max(r["centre window hit (%)"], r["random window hit (%)"]) / 100  # the better trivial window
    hit, n = r["trigger hit, scored poisons (%)"] / 100, r["scored poisons"]
    margin = (hit - base) * n  # how many more of the scored poisons' triggers its windows hit than that window's
    z = (hit - base) / np.sqrt(max(base * (1 - base), 1e-9) / max(n, 1))  # binomial noise of n draws at that rate
    verdict = (
        f"holds, by {margin:.0f} images (z = {z:.1f} against the better baseline's rate)."
        if z >= 2
        else f"is within noise ({margin:+.0f} images, z = {z:.1f} < 2)."
        if margin > 0
        else "does not hold."
    )
    lines.append(
        f"- {r['method']} ({r['count']} count), {r['ensemble']} ensemble (w = {r['w']} px): top-20 {r['top-20 acc (%)']:.0f}% "
        f"({r['top-20, ties at random (%)']:.1f}% with the ties at the 20th place broken at random; chance "
        f"{100 * poison.mean():.0f}%), recall {r['recall (%)']:.1f}%, {r['clean removed (%)']:.1f}% of the clean "
        f"images removed (goal: at most 2% at recall at least 95%: "
        f"{'met' if r['clean removed (%)'] <= 2 and r['recall (%)'] >= 95 else 'missed'}); its windows hit "
        f"{r['trigger hit, scored poisons (%)']:.1f}% of the triggers of its {r['scored poisons']:.0f} scored poisons "
        f"({r['trigger hit, scored poisons (%)'] * r['scored poisons'] / 100:.0f}), a centre window "
        f"{r['centre window hit (%)']:.1f}% "
        f"and a random one {r['random window hit (%)']:.1f}%: the localization claim {verdict}"
    )
ids = cluster.defense_ids(P, cluster.training_set(P, "poisoned")[0])  # the search's tie order (notebook 05)
for label, pm in DEFENDERS.items():  # the caveat of every w above: which rule chose it, what the paper's picks
    f, rule = found[label], pm.search.window_rule
    sweep = f["sweep"].set_index("window")

    def top20(w, f=f):  # the search's top-20 accuracy had the search used side w
        return 100 * search.top_k_accuracy(
            search.SearchResult(f[f"scores_w{w}"], f[f"scored_w{w}"], ids=ids).ranking(), poison, 20
        )

    rsd_w = int(sweep.index[sweep["rsd_pick"]][0])
    lines.append(
        f"- Window of {label}: w = {f['window']} px, picked blind by the `{rule}` window rule"
        + (
            " (the project's rule, chosen with the `cifar10` profile's default attack in view: notebook 05)"
            if rule != "rsd"
            else ""
        )
        + f"; the search's top-20 there is {top20(f['window']):.0f}%. The paper's rule (RSD) picks w = {rsd_w} px "
        f"here, where the search's top-20 is {top20(rsd_w):.0f}%."
    )
assignment = np.load(cluster.cluster_stage(P, "poisoned") / "clustering.npz")["assignment"]
for label in DEFENDERS:  # the trivial removal a recall must beat: no classifier, the top-20's whole clusters
    cut = np.isin(assignment, assignment[found[label]["ranking"][:20]])
    lines.append(
        f"- Without a classifier, {label}: removing every image of the {len(np.unique(assignment[cut]))} clusters of "
        f"its top-20 gives recall {100 * (cut & poison).sum() / poison.sum():.1f}% with "
        f"{100 * (cut & ~poison).sum() / (~poison).sum():.1f}% of the clean images removed; the classifier's recall "
        "above is worth what it adds to that."
    )
notebook.show_markdown("\n".join(lines))
io.write_text(plotting.figure_path(P.profile, NB, "detection", ".md"), "\n".join(lines) + "\n")  # the book's first page
columns = ["method", "count", "ensemble", "w", "top-20 acc (%)", "top-20, ties at random (%)", "recall (%)"]
columns += ["precision (%)", "clean removed (%)"]
plotting.save_table(table1[columns], P.profile, NB, "table1_headline")
table1

# %% [markdown]
# ## Raw poison scores against the poison classifier (paper Figure 5)
# Precision and recall over the training set ranked by the search's poison scores and by the classifier
# ensemble's logit. The search scores only a few percent of the images (the paper's Figure 5 scores all
# of them); the unscored ones rank last, in a random (seeded) order.


# %% tags=["hide-input"]
def pr_curve(order):
    hits = np.cumsum(poison[order])
    return hits / poison.sum(), hits / np.arange(1, len(order) + 1)


def average_precision(order):
    """Mean precision at each poison's rank (%), over the images ``order`` ranks."""
    hit = poison[order]
    return 100 * (np.cumsum(hit) / np.arange(1, len(order) + 1))[hit].mean()


fig, axes = plt.subplots(1, len(DEFENDERS), figsize=(3.6 * len(DEFENDERS), 4.4), sharey=True)
precision_at, on_scored = {}, {}
for ax, (label, pm) in zip(axes, DEFENDERS.items(), strict=True):
    scores = pd.read_csv(classify.classifier_stage(pm, "poisoned") / "scores.csv")
    ranking = found[label]["ranking"]
    n_scored = int(found[label]["scored"].sum())
    ranking = np.r_[ranking[:n_scored], np.random.default_rng(0).permutation(ranking[n_scored:])]
    scored = ranking[:n_scored]  # the same images ranked both ways: a fair comparison
    logit = scores["classifier_logit"].to_numpy()
    on_scored[label] = (
        n_scored,
        100 * poison[scored].sum() / poison.sum(),  # the most recall the search's ranking reaches before its tail
        100 * poison[scored].mean(),
        average_precision(scored),
        average_precision(scored[np.argsort(-logit[scored], kind="stable")]),
    )
    for name, order in (
        ("poison score (search)", ranking),
        ("poison classifier", np.argsort(-scores["classifier_logit"].to_numpy(), kind="stable")),
    ):
        rec, prec = pr_curve(order)
        ax.plot(100 * rec, 100 * prec, label=name)
        precision_at[label, name] = 100 * prec[poison[order]].mean()  # average precision over the poisons
    r = removed[label]
    ax.plot(
        100 * (r & poison).sum() / poison.sum(),
        100 * (r & poison).sum() / max(r.sum(), 1),
        "k*",
        ms=12,
        label="removed set",
    )
    ax.set(title=label, xlabel="recall (%)", ylim=(0, 102), xlim=(0, 102))
axes[0].set_ylabel("precision (%)")
axes[0].legend(fontsize=8)
fig.tight_layout()
plotting.savefig(fig, P.profile, NB, "precision_recall", dpi=P.figures.dpi)
notebook.show_markdown(
    "\n".join(
        f"- {label}: average precision {precision_at[label, 'poison score (search)']:.1f}% for the search's "
        f"ranking, {precision_at[label, 'poison classifier']:.1f}% for the classifier's (chance "
        f"{100 * poison.mean():.0f}%). The search scored {on_scored[label][0]} images holding "
        f"{on_scored[label][1]:.1f}% of the poisons: past that recall its curve is the random tail's. On those "
        f"scored images alone (chance "
        f"{on_scored[label][2]:.0f}%): {on_scored[label][3]:.1f}% for the search, {on_scored[label][4]:.1f}% for "
        "the classifier."
        for label in DEFENDERS
    )
    + "\nThe search ranks only what it scored; the classifier ranks every image. The fair comparison is on the "
    "scored images: where the classifier's precision is higher there too, it ranks the same images better than "
    "the flip test that taught it."
)

# %% [markdown]
# ## The most and the least poisonous images (paper Figure 2)
# Ranked by the classifier ensemble of the profile's method (`search.method`); poisoned images have their
# trigger boxed.

# %%
X, _ = cluster.training_set(P, "poisoned")
scores = pd.read_csv(classify.classifier_stage(search.with_method(P, P.search.method), "poisoned") / "scores.csv")
order = np.argsort(-scores["classifier_logit"].to_numpy(), kind="stable")
n = P.figures.n_examples // 2
for name, idx in (("most_poisonous", order[:n]), ("least_poisonous", order[-n:])):
    boxes = A.boxes_of(idx)
    titles = [("poison " if poison[i] else "") + D.train.classes[D.train.labels[i]] for i in idx]
    fig = plotting.show_images(X[idx].numpy(), titles, boxes, ncols=-(-n // 2))  # two rows fit the page
    fig.suptitle(name.replace("_", " "), y=1.05)
    plotting.savefig(fig, P.profile, NB, name, dpi=P.figures.dpi)

# %% [markdown]
# ## The defense on clean data (paper Table 10)
# A defender does not know whether the data is poisoned. The same defenses run on the clean training set
# with the clean model, choosing their window blind as before; every image they remove is a false removal
# (the paper's Table 10 removes a small share of its clean set, read from `params/paper.yaml` and printed
# below). A defense that finds few poisons on the poisoned set removes little here too: that is no merit.

# %% tags=["hide-input"]
rows = []
for label, pm in DEFENDERS.items():
    logits = np.load(classify.classifier_stage(pm, "clean") / "classifier.npz")["logits"]
    w = search.load_search(search.search_stage(pm, "clean"))["window"]
    for rule in classify.ENSEMBLES:
        r = classify.ensemble_removed(logits, rule)
        rows.append(
            {
                "method": label,
                "count": search.score_rule(pm),
                "ensemble": rule,
                "data": "clean",
                "w (blind)": w,
                "training images": len(r),
                "removed": int(r.sum()),
                "removed (%)": round(100 * r.mean(), 2),
            }
        )
table10 = pd.DataFrame(rows)
plotting.save_table(table10, P.profile, NB, "table10_clean_data")
paper_removed = 100 * paper.entry("table10")["removed_share"]  # the paper removes about this share (%)
recall_of = table1.set_index(["method", "ensemble"])["recall (%)"]  # Table 1: on the poisoned set
notebook.show_markdown(
    "\n".join(
        f"- {r['method']} ({r['ensemble']} ensemble) picks w = {r['w (blind)']} px on the clean set and removes "
        f"{r['removed (%)']:.1f}% of it ({'within' if r['removed (%)'] <= paper_removed else 'above'} the paper's "
        f"{paper_removed:.0f}%)"
        + (
            f"; on the poisoned set it finds only {found_share:.1f}% of the poisons, so this says little."
            if (found_share := recall_of[r["method"], r["ensemble"]]) < 95
            else "."
        )
        for _, r in table10.iterrows()
    )
)
table10

# %% [markdown]
# ## Beyond one configuration
# A defense evaluated on one attack proves little: the numbers above belong to one target class and one
# trigger. `python -m helpers.studies.generality` runs the same pipeline, with the defenses set exactly as the
# profile sets them (nothing in them reads the attack), over other targets, trigger seeds, a trigger image
# that is not a colour grid, other trigger sizes and repeated patches, and writes one table
# (`figures/<profile>/07_generality.md`). It is shown here when it exists for this profile.

# %% tags=["hide-input"]
general_path = notebook.figure_path(P.profile, "07_generality.csv")
if general_path.is_file():
    general = pd.read_csv(general_path)
    LABELS = tuple(c.removesuffix(" w") for c in general if c.endswith(" w"))  # each method, a classifier variant
    lines = []
    for _, r in general.iterrows():
        ratio = r["probe ASR (%)"] / r["clean model ASR (%)"]
        backdoor = (
            f"a backdoor by the rule ({ratio:.1f}x)" if r["backdoor present"] else f"**not planted** ({ratio:.1f}x)"
        )
        parts = [
            f"{m} (w = {r[f'{m} w']:.0f} px): top-20 {r[f'{m} top-20 (%)']:.0f}%, recall {r[f'{m} recall (%)']:.1f}%, "
            f"{r[f'{m} clean removed (%)']:.1f}% of clean images removed (unanimous ensemble: recall "
            f"{r[f'{m} recall, unanimous (%)']:.1f}%, {r[f'{m} clean removed, unanimous (%)']:.1f}%), trigger hit "
            f"{r[f'{m} trigger hit (%)']:.0f}% (centre {r[f'{m} centre hit (%)']:.0f}%, random "
            f"{r[f'{m} random hit (%)']:.0f}%)"
            for m in LABELS
            if f"{m} w" in r and np.isfinite(r[f"{m} w"])  # a method not run on a configuration has no row
        ]
        lines.append(
            f"- **{r['configuration']}** ({r['target']}, {r['trigger px']} px): {backdoor} (probe ASR "
            f"{r['probe ASR (%)']:.1f}% vs {r['clean model ASR (%)']:.1f}% for the clean model); " + "; ".join(parts)
        )
    planted = general[general["backdoor present"]]

    def meets(r, m):  # issue 22's goal for a defense on one configuration
        return bool(
            r[f"{m} top-20 (%)"] >= 90
            and r[f"{m} recall (%)"] >= 95
            and r[f"{m} clean removed (%)"] <= 2
            and r[f"{m} trigger hit (%)"] > max(r[f"{m} centre hit (%)"], r[f"{m} random hit (%)"])
        )

    summary = [
        f"**In short.** {len(general)} configurations, {len(planted)} of them planting a backdoor by the rule "
        f"({', '.join(f'`{c}`' for c in planted['configuration']) or 'none'})."
    ]
    for m in ("PatchSearch", "PoisonCAM"):
        ran = general[np.isfinite(general[f"{m} w"])]
        high = ran[ran[f"{m} top-20 (%)"] >= 90]
        summary.append(
            f"{m}: top-20 at least 90% on {len(high)} of {len(ran)}, of which {int(high['backdoor present'].sum())} "
            f"planted; the goal (top-20 at least 90%, recall at least 95%, at most 2% of the clean images removed, "
            f"trigger hit above the centre and random windows) met on "
            f"{sum(meets(r, m) for _, r in ran[ran['backdoor present']].iterrows())} of "
            f"{int(ran['backdoor present'].sum())} planted."
        )
    if "PatchSearch recall, cluster vote (%)" in general:  # the removals the clusters second (notebook 06)
        for m in ("PatchSearch", "PoisonCAM"):
            voted = planted[np.isfinite(planted[f"{m} recall, cluster vote (%)"])]
            voted = voted.assign(
                **{
                    f"{m} recall (%)": voted[f"{m} recall, cluster vote (%)"],
                    f"{m} clean removed (%)": voted[f"{m} clean removed, cluster vote (%)"],
                }
            )
            held = voted[voted["cluster vote held out"].astype(bool)]  # rows older than the vote have no mark
            summary.append(
                f"{m} with the cluster vote: the goal met on {sum(meets(r, m) for _, r in voted.iterrows())} of the "
                f"{len(voted)} planted configurations it has run on ({sum(meets(r, m) for _, r in held.iterrows())} of "
                f"the {len(held)} held out from its choice)."
            )
        # the vote's blind test: every configuration held out from its choice, planted or not (recall and clean
        # removals without the vote -> with it, for each defense that ran there)
        unseen = general[general["cluster vote held out"].fillna(False).astype(bool)]
        judged = [
            f"`{r['configuration']}` {m}: recall {r[f'{m} recall (%)']:.1f}% -> "
            f"{r[f'{m} recall, cluster vote (%)']:.1f}%, clean images removed {r[f'{m} clean removed (%)']:.1f}% -> "
            f"{r[f'{m} clean removed, cluster vote (%)']:.1f}%"
            for _, r in unseen.iterrows()
            for m in LABELS
            if f"{m} recall, cluster vote (%)" in r and np.isfinite(r[f"{m} recall, cluster vote (%)"])
        ]
        if judged:
            summary.append(
                "**The cluster vote, held out** (configurations made or run after it was fixed): "
                + "; ".join(judged)
                + "."
            )
    summary.append(
        "The search reads the SSL model's clusters, not the probe: a trigger that gathers its images into "
        "clusters is found even where the probe shows no backdoor, so top-20 can be high on a configuration "
        "that plants none. The clean-set columns repeat from row to row: the clean set and the clean model do "
        "not depend on the attack.\n"
    )
    lines.insert(0, " ".join(summary))
    import yaml

    used = yaml.safe_load(notebook.figure_path(P.profile, "07_generality_params_default.yaml").read_text())
    now = P.to_dict()
    changed = [  # keys of the defenses and the training whose value differs from the one the rows were made with
        f"`{section}.{key}` ({used[section].get(key, '(absent)')!r} then, {value!r} now)"
        for section in ("ssl", "eval", "cluster", "search", "classifier")
        for key, value in now[section].items()
        if used.get(section, {}).get(key, params.ADDED_LATER.get((section, key))) != value
    ]
    if changed:  # the rows were computed before the profile changed: say so, key by key, before the rows
        lines.insert(
            0,
            "**These rows are older than the profile**: they were computed with other values of "
            + ", ".join(changed)
            + " (`07_generality_params_default.yaml`). The blind window the current rule picks on every "
            "configuration is in `07_generality_blind_window.md`; the rows follow the profile once the "
            "configurations are rerun (`python -m helpers.studies.generality --run NAME`).\n",
        )
    notebook.show_markdown("\n".join(lines))
    per_method = pd.concat(  # one row per configuration and defense, the method's name out of the columns
        [
            general[["configuration"]].assign(
                method=m, **{c.removeprefix(f"{m} "): general[c] for c in general if c.startswith(f"{m} ")}
            )
            for m in LABELS
            if f"{m} w" in general
        ],
        ignore_index=True,
    )
    attack_columns = [c for c in general if not c.startswith(LABELS) and c != "attack"]
    notebook.show_table(general[attack_columns])  # the attack (its overrides: the params files beside the table)
    for columns in (  # what a reader compares: detection, the unanimous ensemble, where the windows fall
        ["w", "top-20 (%)", "recall (%)", "clean removed (%)", "clean set removed (%)", "defended ASR (%)"],
        ["recall, unanimous (%)", "clean removed, unanimous (%)", "clean set removed, unanimous (%)", "held out"],
        ["recall, cluster vote (%)", "clean removed, cluster vote (%)", "clean set removed, cluster vote (%)"],
        ["trigger hit (%)", "centre hit (%)", "random hit (%)"],
    ):
        notebook.show_table(per_method[["configuration", "method", *[c for c in columns if c in per_method]]])
else:
    print(
        f"no generality table for profile {P.profile} yet: python -m helpers.studies.generality --publish {P.profile}"
    )

# %% [markdown]
# ### The same attack, other SSL trainings
# Every detection number above comes from one SSL training (Table 2 over SSL seeds shows how much the backdoor
# itself varies between trainings). `07_generality_seeds` runs PatchSearch, set exactly as the profile sets it,
# on the backdoored models that the other SSL seeds trained on the same poisoned set
# (`python -m helpers.studies.generality --table generality_seeds`).

# %% tags=["hide-input"]
seeds_path = notebook.figure_path(P.profile, "07_generality_seeds.csv")
if seeds_path.is_file():
    other = pd.read_csv(seeds_path)
    other = other[np.isfinite(other["PatchSearch w"])]
    mine = table1[(table1["method"] == "PatchSearch") & (table1["ensemble"] == "mean")].iloc[0]
    low, high = other["PatchSearch top-20 (%)"].min(), other["PatchSearch top-20 (%)"].max()
    commits = sorted(set(notebook.row_commits(P.profile, "generality_seeds").values()))
    notebook.show_markdown(
        f"On the backdoored models of {len(other)} other SSL trainings ({int(other['backdoor present'].sum())} of "
        f"them planted by the rule), PatchSearch's top-20 accuracy is {low:.0f}-{high:.0f}% (chance "
        f"{100 * poison.mean():.0f}%) and its recall {other['PatchSearch recall (%)'].min():.1f}-"
        f"{other['PatchSearch recall (%)'].max():.1f}%, against {mine['top-20 acc (%)']:.0f}% and "
        f"{mine['recall (%)']:.1f}% on SSL seed {P.ssl.seed} above. "
        + (
            "The detection shown above is not what another training of the same setting gets: it rests on one training."
            if mine["top-20 acc (%)"] > high + 5
            else "The detection shown above is within the range of the other trainings."
        )
        + (
            f" These rows were computed at commit {', '.join(notebook.short_commit(c) for c in commits)}."
            if commits
            else ""
        )
    )
    notebook.show_table(
        other[
            [
                "configuration",
                "probe ASR (%)",
                "clean model ASR (%)",
                "backdoor present",
                *[c for c in other if c.startswith("PatchSearch ") and "unanimous" not in c and "clean set" not in c],
            ]
        ].dropna(axis=1, how="all")
    )

# %% [markdown]
# ## Exercises
# 1. **Is the difference real?** From `per_seed`, test whether PatchSearch's ASR differs from the clean
#    model's and from the backdoored model's (a Welch t-test over the probe seeds, `scipy.stats` or by
#    hand). With `eval.probe_seeds` seeds, how large must a difference be to show? (Seconds.)
# 2. **Fewer labels.** Predict the backdoored model's ASR with a label share between Table 2's two, then
#    evaluate it with `overrides={"eval": {"label_fractions": [0.05]}}` (one evaluation per model: a few
#    minutes).
# 3. **kNN against the probe.** The kNN ASR uses every training label, the probe only a few. Which of the
#    two shows the backdoor more clearly in Table 2, and why might they disagree?
