"""Every cached stage, declared once: what it reads, what it builds on, the code it runs, and what computes it.

A stage is one cached result (``helpers.cache``): a folder keyed by the params it reads and the code it
runs. ``STAGES`` below is the only list of them. Everything else that names stages is derived from it:

- ``params.STAGE_INPUTS``: the params sections a stage's key holds, its own and its upstream stages';
- ``fingerprint.STAGE_CODE``: the ``helpers`` modules whose code its key holds, its own and its upstream
  stages' (``tests/test_fingerprint.py`` fails when a module that this code imports is not named);
- ``params.NETWORK_STAGES`` / ``PRETRAINING_STAGES``: which precision enters its key;
- ``checkpoints.SHIPPED_STAGES``: which results a fresh clone gets instead of computing them;
- ``codelock.STAGE_TASK``: the smoke pipeline task that recomputes it when a renewal must prove its code
  unchanged.

``tests/test_stages.py`` checks that every declared ``compute`` function exists, sits in a module of the
stage's code, and names its stage when it asks the cache; and that the pipeline's tasks exist.

This module imports nothing from ``helpers``: every other module may read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]  # params sections it reads itself (its upstream stages' are added)
    upstream: tuple[str, ...]  # stages whose results (or whose inputs) it builds on
    runs: tuple[str, ...]  # helpers modules its own computation runs (its upstream stages' are added)
    compute: str  # "module.function" that computes it (through ``cache.cached_stage``)
    network: str | None = "network"  # "pretraining": SSL precision; "network": both precisions; None: no network
    shipped: bool = True  # a published run ships its result (``helpers.runners.checkpoints``)
    smoke_task: str = ""  # the smoke pipeline task that computes it (default: its name)
    retired: tuple[str, ...] = ()  # modules merged into others, whose lock identity its key still holds


SSL_CODE = ("ssl", "models", "augment", "compute", "attack", "kernels")  # ssl trains on the attack's set
DEFENSE_CODE = ("cluster", "localize", "search", "classify", "evaluate")
# Modules merged into others with their stages' results proved unchanged (``helpers.runners.codelock renew``): the
# stages that ran them keep their lock identities in their keys, so their shipped results stay valid.
# - loop: a second SSL loop for methods built outside the SSL module, merged into ``ssl.train_ssl``;
# - train: the SSL loop and stage, merged into ``ssl`` beside the methods;
# - defense: the defense's stages, each moved into its stage's module (cluster, localize, search, classify);
# - assess: the evaluation of notebook 08's models, merged into ``evaluate``.
LOOP, TRAIN, DEFENSE, ASSESS = ("loop",), ("train",), ("defense",), ("assess",)

STAGES: tuple[Stage, ...] = (
    Stage("data", ("data",), (), ("data",), "data.load_data", None, False, "prepare"),
    Stage("attack", ("attack",), ("data",), ("attack", "kernels"), "attack.run_attack", None, False, "prepare"),
    # notebook 02: SSL pre-training, on the clean and the poisoned set
    Stage("ssl_clean", ("ssl",), ("data",), SSL_CODE, "ssl.train_stage", "pretraining", retired=TRAIN),
    Stage("ssl_poisoned", ("ssl",), ("attack",), SSL_CODE, "ssl.train_stage", "pretraining", retired=TRAIN),
    # notebook 07: the linear probe and kNN, on clean and patched validation data (the attack's patches)
    Stage("eval_clean", ("eval",), ("ssl_clean", "attack"), ("evaluate", "localize"), "evaluate.evaluate_stage"),
    Stage("eval_poisoned", ("eval",), ("ssl_poisoned",), ("evaluate", "localize"), "evaluate.evaluate_stage"),
    # notebooks 03-06: the defense on the poisoned set with its model, and on the clean set with the clean
    # model (paper Table 10); the clean one never reads the attack, so attack configurations share it
    *(
        stage
        for variant in ("poisoned", "clean")
        for stage in (
            Stage(f"cluster_{variant}", ("cluster",), (f"ssl_{variant}",), DEFENSE_CODE, "cluster.cluster_stage",
                  smoke_task=f"defense_patchsearch_{variant}", retired=DEFENSE),
            Stage(f"search_{variant}", ("search",), (f"cluster_{variant}",), DEFENSE_CODE, "search.search_stage",
                  smoke_task=f"defense_{'poisoncam' if variant == 'poisoned' else 'patchsearch'}_{variant}"),
            Stage(f"classifier_{variant}", ("classifier",), (f"search_{variant}",), DEFENSE_CODE,
                  "classify.classifier_stage", smoke_task=f"defense_patchsearch_{variant}"),
        )
    ),
    # Figure 3: the flip test of every clean training image's patch with the clean model
    Stage("potency_clean", (), ("search_clean",), ("potency",), "potency.potency_stage"),
    # notebook 07: SSL retrained on the poisoned set minus what a defense removed
    Stage("ssl_filtered", (), ("classifier_poisoned",), ("ssl",), "ssl.train_stage",
          smoke_task="ssl_filtered_patchsearch"),
    Stage("eval_filtered", ("eval",), ("ssl_filtered",), ("evaluate",), "evaluate.evaluate_stage",
          smoke_task="eval_filtered_patchsearch"),
    # notebook 08, the rest of the paper: Table 3 (distillation on trusted data)
    Stage("kd_student", ("kd",), ("ssl_poisoned",), ("kd",), "kd.kd_stage", smoke_task="kd_5", retired=LOOP),
    Stage("eval_kd", ("eval",), ("kd_student",), ("evaluate", "localize"), "evaluate.evaluate_model_stage",
          smoke_task="kd_5", retired=ASSESS),
    # Table 8: i-CutMix's parts, each trained on the poisoned set
    Stage("ssl_mix", ("ssl", "mix"), ("attack",), ("mixing", *SSL_CODE), "mixing.mix_stage", "pretraining",
          smoke_task="mix_black_onehot", retired=LOOP + TRAIN),
    Stage("eval_mix", ("eval",), ("ssl_mix",), ("evaluate", "localize"), "evaluate.evaluate_model_stage",
          smoke_task="mix_black_onehot", retired=ASSESS),
    # Table 10's second half: SSL retrained on the clean set minus what a defense removed from it. Its key
    # holds the attack section too, which it never reads (an attack change recomputes it): so it shipped.
    Stage("ssl_clean_filtered", ("attack",), ("classifier_clean",), ("retrain", "ssl"),
          "retrain.retrain_clean_stage", smoke_task="retrain_clean_patchsearch", retired=LOOP),
    Stage("eval_clean_filtered", ("eval",), ("ssl_clean_filtered",), ("evaluate",),
          "evaluate.evaluate_model_stage", smoke_task="retrain_clean_patchsearch", retired=ASSESS),
    # Table 4: the whole backbone finetuned on the probe's labels, evaluated on clean and patched data
    *(
        Stage(f"finetune_{variant}", ("attack", "eval", "finetune"), (f"ssl_{variant}",), ("finetune", *DEFENSE_CODE),
              "finetune.finetune_stage", smoke_task=task, retired=DEFENSE)
        for variant, task in (("clean", "finetune_clean"), ("poisoned", "finetune_poisoned"),
                              ("filtered", "finetune_filtered_patchsearch"))
    ),
)  # fmt: skip

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def lineage(name: str) -> tuple[str, ...]:
    """Stage ``name`` and every stage it builds on, directly or not, each once, nearest first."""
    out: dict[str, None] = {}
    todo = [name]
    while todo:
        stage = todo.pop(0)
        if stage not in out:
            out[stage] = None
            todo += BY_NAME[stage].upstream
    return tuple(out)


def upstream_closure(name: str) -> tuple[str, ...]:
    """Every stage that ``name`` builds on, directly or not."""
    return lineage(name)[1:]


def _collect(name: str, field: str) -> tuple[str, ...]:
    """``field`` of stage ``name`` and of every stage upstream of it, each entry once, nearest first."""
    return tuple(dict.fromkeys(x for stage in lineage(name) for x in getattr(BY_NAME[stage], field)))


def sections(name: str) -> tuple[str, ...]:
    """The params sections stage ``name``'s key holds: its own and its upstream stages'."""
    return _collect(name, "reads")


def code(name: str) -> tuple[str, ...]:
    """The ``helpers`` modules stage ``name``'s key holds: the ones it runs, the retired ones whose code it ran,
    and its upstream stages'."""
    return tuple(dict.fromkeys(_collect(name, "runs") + _collect(name, "retired")))


def retired() -> frozenset[str]:
    """Modules no longer in the package whose lock identities some stage's key still holds."""
    return frozenset(m for s in STAGES for m in s.retired)


def smoke_task(name: str) -> str:
    return BY_NAME[name].smoke_task or name
