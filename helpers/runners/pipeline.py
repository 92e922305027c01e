"""Compute a profile's expensive stages side by side before the notebooks read them from the cache.

    python -m helpers.runners.pipeline --params params/cifar10.yaml [--workers 2]

The tasks below form a graph (SSL models, then the defenses on them, then the models retrained on the
defenses' filtered lists). On a CPU they run one per core, one thread each (``make bench``: two SSL
trainings on one thread each gave 1.03x the images per second of one training on two threads), so the
serial parts of each stage (data, evaluation, the defenses' loops) overlap. The scheduler starts the
ready task with the longest remaining path first, each in its own process with ``threads`` torch threads,
and logs each task's output to ``<log dir>/<task>.log``. Every task is a cached stage: a finished task
is a cache hit and costs seconds; a killed run resumes where it stopped. On a GPU the tasks run one after
another (one process holds the device).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .. import paths
from ..params import Params

log = logging.getLogger("helpers.runners.pipeline")


@dataclass(frozen=True)
class Task:
    name: str
    deps: tuple[str, ...]
    minutes: float  # rough cost on one CPU thread (bf16), used only to order the ready tasks
    stages: tuple[str, ...] = ()  # the cached stages it computes (helpers.stages; tests check deps against them)


DEFENSES = ("patchsearch", "poisoncam")


VARIANT_TASKS = (  # what a profile variant adds (Table 2's rows of another SSL method, Table 9's attack)
    "ssl_clean", "ssl_clean_icutmix", "ssl_poisoned", "ssl_poisoned_icutmix", "defense_patchsearch_poisoned",
    "ssl_filtered_patchsearch", "ssl_filtered_patchsearch_icutmix", "defense_poisoncam_poisoned",
    "ssl_filtered_poisoncam",
)  # fmt: skip


def tasks(variants: tuple[str, ...] = ()) -> list[Task]:
    """The stages of the default pipeline, what notebooks 02-07 read; with ``variants`` (names of the
    profile's ``variants`` section), also each variant's models, evaluations and PatchSearch defense, as
    ``<variant>:<task>``."""
    out = _base_tasks()
    for variant in variants:
        keep = select(
            _base_tasks(), [*VARIANT_TASKS, *(f"eval_{t[4:]}" for t in VARIANT_TASKS if t.startswith("ssl_"))]
        )
        out += [
            Task(
                f"{variant}:{t.name}",
                tuple(d if d == "prepare" else f"{variant}:{d}" for d in t.deps),
                t.minutes,
                t.stages,
            )
            for t in keep
            if t.name != "prepare"
        ]
    return out


# The variants notebooks 07 and 08 read, when the profile defines them, and the evaluations they show
NOTEBOOK_VARIANTS = {
    "byol": tuple(  # Table 2's BYOL rows (notebook 07)
        f"eval_{m}" for m in ("clean", "clean_icutmix", "poisoned", "poisoned_icutmix", "filtered_patchsearch")
    )
    + ("eval_filtered_patchsearch_icutmix",),
    "repeated": ("eval_clean", "eval_poisoned", "eval_filtered_patchsearch", "eval_filtered_poisoncam"),  # Table 9
    **{seed: ("eval_clean", "eval_poisoned") for seed in ("ssl_seed1", "ssl_seed2", "byol_seed1", "byol_seed2")},
}  # the last four: Table 2 over SSL training seeds (notebook 07)


def notebook_tasks(variant_names) -> tuple[tuple[str, ...], list[str]]:
    """What ``make reproduce`` computes before the notebooks: every task of the profile itself, and of each
    of ``variant_names`` (the profile's variants) that a notebook reads, the evaluations it shows. Returns
    the variants and the task names (for ``run_all``)."""
    variants = tuple(v for v in variant_names if v in NOTEBOOK_VARIANTS)
    names = [t.name for t in _base_tasks()] + [f"{v}:{t}" for v in variants for t in NOTEBOOK_VARIANTS[v]]
    return variants, names


def _base_tasks() -> list[Task]:
    # data and attack, once, before anything reads them side by side
    out = [Task("prepare", (), 0.5, ("data", "attack"))]
    for variant in ("clean", "poisoned"):
        for icutmix in (False, True):
            name = f"ssl_{variant}" + ("_icutmix" if icutmix else "")
            out += [
                Task(name, ("prepare",), 12, (f"ssl_{variant}",)),
                Task(f"eval_{name[4:]}", (name,), 1, (f"eval_{variant}",)),
            ]
    for variant in ("poisoned", "clean"):
        for method in DEFENSES:
            computes = tuple(f"{stage}_{variant}" for stage in ("cluster", "search", "classifier"))
            out.append(Task(f"defense_{method}_{variant}", (f"ssl_{variant}",), 10, computes))
    for icutmix in (False, True):  # Figure 3: the potency of clean patches, with and without i-CutMix
        name = "potency_clean" + ("_icutmix" if icutmix else "")
        deps = ("defense_patchsearch_clean", "ssl_clean" + ("_icutmix" if icutmix else ""))
        out.append(Task(name, deps, 12, ("potency_clean",)))
    for method, icutmix in (("patchsearch", False), ("patchsearch", True), ("poisoncam", False)):
        name = f"ssl_filtered_{method}" + ("_icutmix" if icutmix else "")
        out += [
            Task(name, (f"defense_{method}_poisoned",), 12, ("ssl_filtered",)),
            Task(f"eval_filtered_{method}" + ("_icutmix" if icutmix else ""), (name,), 1, ("eval_filtered",)),
        ]
    return out + _more_tasks()


MIX_ROWS = (("crop", "onehot"), ("black", "weighted"), ("black", "onehot"), ("noise", "weighted"), ("noise", "onehot"))
FINETUNED = ("clean", "poisoned", "filtered_patchsearch", "filtered_patchsearch_icutmix")


def _more_tasks() -> list[Task]:
    """Notebook 08's stages (the rest of the paper), each task its training and the evaluation of it."""
    from ..kd import TABLE3_TRUSTED

    kd, mix, retrain = ("kd_student", "eval_kd"), ("ssl_mix", "eval_mix"), ("ssl_clean_filtered", "eval_clean_filtered")
    out = [Task(f"kd_{round(100 * s)}", ("ssl_poisoned",), 16 * s / 0.25, kd) for s in TABLE3_TRUSTED]
    out += [Task(f"mix_{fill}_{loss}", ("prepare",), 13, mix) for fill, loss in MIX_ROWS]  # crop + weighted: i-CutMix
    out += [Task(f"retrain_clean_{method}", (f"defense_{method}_clean",), 13, retrain) for method in DEFENSES]
    out += [Task(f"finetune_{name}", (f"ssl_{name}",), 8, (f"finetune_{name.split('_')[0]}",)) for name in FINETUNED]
    return out


def run_more_task(params: Params, name: str, progress: bool = False) -> bool:
    """Run one of ``_more_tasks``; False when ``name`` is not one of them."""
    from ..evaluate import evaluate_model_stage
    from ..search import with_method

    kind, _, rest = name.partition("_")
    if kind == "kd":
        from ..kd import kd_stage, with_trusted

        params = with_trusted(params, int(rest) / 100)
        evaluate_model_stage("eval_kd", params, lambda: kd_stage(params, progress), progress)
    elif kind == "mix":
        from ..mixing import mix_stage, with_mix

        params = with_mix(params, *rest.split("_"))
        evaluate_model_stage("eval_mix", params, lambda: mix_stage(params, progress), progress)
    elif kind == "retrain":
        from ..retrain import retrain_clean_stage

        params = with_method(params, rest.removeprefix("clean_"))
        evaluate_model_stage("eval_clean_filtered", params, lambda: retrain_clean_stage(params, progress), progress)
    elif kind == "finetune":
        from ..finetune import finetune_stage

        icutmix, rest = rest.endswith("_icutmix"), rest.removesuffix("_icutmix")
        if rest.startswith("filtered_"):
            params, rest = with_method(params, rest.removeprefix("filtered_")), "filtered"
        finetune_stage(params, rest, icutmix, progress)
    else:
        return False
    return True


def run_task(params: Params, name: str, progress: bool = False) -> None:
    """Compute one task's stages (in this process)."""
    from ..attack import run_attack
    from ..classify import classifier_stage, filtered_model_stage
    from ..data import load_data
    from ..evaluate import evaluate_stage
    from ..potency import potency_stage
    from ..search import with_method
    from ..ssl import train_stage

    params, name, base, icutmix = _parse(params, name)
    if name == "prepare":
        run_attack(params, load_data(params, progress=progress), progress=progress)
    elif base == "potency_clean":
        potency_stage(params, icutmix, progress)
    elif base.startswith("ssl_filtered_"):
        filtered_model_stage(with_method(params, base.removeprefix("ssl_filtered_")), icutmix, progress)
    elif base.startswith("eval_filtered_"):
        evaluate_stage(with_method(params, base.removeprefix("eval_filtered_")), "filtered", icutmix, progress)
    elif base.startswith("ssl_"):
        train_stage(params, base.removeprefix("ssl_"), icutmix, progress)
    elif base.startswith("eval_"):
        evaluate_stage(params, base.removeprefix("eval_"), icutmix, progress)
    elif base.startswith("defense_"):
        method, variant = base.removeprefix("defense_").split("_")
        classifier_stage(with_method(params, method), variant, progress)
    elif not run_more_task(params, name, progress):
        raise ValueError(f"unknown task {name!r} (known: {', '.join(t.name for t in tasks())})")


def _priorities(graph: list[Task]) -> dict[str, float]:
    """Longest remaining path (own cost plus the costliest chain of tasks waiting on it)."""
    children: dict[str, list[str]] = {t.name: [] for t in graph}
    for t in graph:
        for d in t.deps:
            children[d].append(t.name)
    cost = {t.name: t.minutes for t in graph}
    memo: dict[str, float] = {}

    def level(name: str) -> float:
        if name not in memo:
            memo[name] = cost[name] + max((level(c) for c in children[name]), default=0.0)
        return memo[name]

    return {t.name: level(t.name) for t in graph}


def default_workers() -> tuple[int, int]:
    """(processes, torch threads each): one per core on a CPU; one process with every core on a GPU."""
    import torch

    cpus = os.cpu_count() or 1
    if torch.cuda.is_available():
        return 1, cpus
    return cpus, 1


def select(graph: list[Task], only: list[str] | None, finished: frozenset[str] = frozenset()) -> list[Task]:
    """The tasks named in ``only`` and every task they need; all of them when ``only`` is empty. A task in
    ``finished`` (its result is in the cache) needs nothing: the tasks only it needs are left out."""
    by_name = {t.name: t for t in graph}
    if finished:
        graph = [dataclasses.replace(t, deps=()) if t.name in finished else t for t in graph]
        by_name = {t.name: t for t in graph}
        only = only or [t.name for t in graph if not any(t.name in u.deps for u in graph)]  # the graph's ends
    if not only:
        return graph
    unknown = [name for name in only if name not in by_name]
    if unknown:
        raise ValueError(f"unknown pipeline task(s) {', '.join(unknown)} (known: {', '.join(by_name)})")
    keep, todo = set(), list(only)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo += by_name[name].deps
    return [t for t in graph if t.name in keep]


def _parse(params: Params, name: str) -> tuple[Params, str, str, bool]:
    """A task name's parts: the params it runs with (its variant's, if it names one), the name without the
    variant, that name without ``_icutmix``, and whether it trains or evaluates with i-CutMix."""
    if ":" in name:  # a profile variant's task
        from ..params import with_variant

        variant, name = name.split(":", 1)
        params = with_variant(params, variant)
    return params, name, name.removesuffix("_icutmix"), name.endswith("_icutmix")


def finished_evaluations(params: Params, names: list[str]) -> frozenset[str]:
    """The evaluation tasks (``[variant:]eval_*``) among ``names`` whose stage is in the cache: a finished
    evaluation needs no model (``evaluate_stage`` trains one only on a miss), so a fresh clone given the
    shipped evaluation of a model that is not shipped trains nothing."""
    from ..cache import cached_result
    from ..search import with_method

    out = set()
    for full in names:
        run, _, base, icutmix = _parse(params, full)
        if not base.startswith("eval_"):
            continue
        run = dataclasses.replace(run, ssl=dataclasses.replace(run.ssl, icutmix=icutmix))
        if base.startswith("eval_filtered_"):
            run, base = with_method(run, base.removeprefix("eval_filtered_")), "eval_filtered"
        if cached_result(base, run) is not None:
            out.add(full)
    return frozenset(out)


def run_all(
    params_path: Path,
    log_dir: Path,
    workers: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    only: list[str] | None = None,
    precision: str | None = None,
    variants: tuple[str, ...] = (),
) -> dict[str, dict]:
    """Run the tasks of ``tasks()`` (those of ``only`` and what they need), each a process of
    ``python -m helpers.runners.pipeline --task``; ``precision`` overrides ``compute.precision``. Returns each task's
    wall seconds and exit code. A failed task stops the scheduling and raises, naming its log."""
    default_procs, default_threads = default_workers()
    workers, threads = workers or default_procs, threads or default_threads
    variants = tuple(dict.fromkeys([*variants, *(n.split(":", 1)[0] for n in only or [] if ":" in n)]))
    from ..params import load, with_resolved_root

    params = with_compute(with_resolved_root(load(params_path)), precision)
    from ..cache import clean_abandoned

    for line in clean_abandoned():
        log.info("removed the temporary folder of a run that stopped: %s", line)
    graph = select(tasks(variants), only, finished_evaluations(params, [t.name for t in tasks(variants)]))
    priority = _priorities(graph)
    log_dir.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    pending = {t.name: t for t in graph}
    failed: list[str] = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_MININTERVAL": "10"}
    bar = tqdm(total=len(graph), desc=f"pipeline ({workers} x {threads} threads)", disable=not progress)
    with stop_on_sigterm():
        try:
            while (pending and not failed) or running:
                ready = sorted(
                    (t for t in pending.values() if all(d in done for d in t.deps)), key=lambda t: -priority[t.name]
                )
                while ready and len(running) < workers and not failed:
                    task = ready.pop(0)
                    del pending[task.name]
                    out = open(log_dir / f"{task.name}.log", "w")  # noqa: SIM115 (closed when the task ends)
                    cmd = [
                        sys.executable,
                        "-m",
                        "helpers.runners.pipeline",
                        "--params",
                        str(params_path),
                        "--task",
                        task.name,
                    ]
                    cmd += ["--threads", str(threads)] + (["--precision", precision] if precision else [])
                    proc = subprocess.Popen(  # a process group of its own: stopping the run stops all it started
                        cmd, cwd=paths.REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                    )
                    running[task.name] = (proc, time.perf_counter(), out)
                    log.info("started %s", task.name)
                time.sleep(0.5)
                for name, (proc, start, out) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    out.close()
                    del running[name]
                    done[name] = {"seconds": round(time.perf_counter() - start, 1), "returncode": proc.returncode}
                    bar.update(1)
                    log.info("finished %s in %.1f min (exit %d)", name, done[name]["seconds"] / 60, proc.returncode)
                    if proc.returncode != 0:
                        failed.append(name)
                        if running:  # their stages are sound: let them finish, start nothing new
                            log.info("%s failed: waiting for %s to finish, then stopping", name, ", ".join(running))
        except BaseException:
            log.warning(
                "stopped: %d tasks finished (%s); stopping %s; a rerun resumes from the finished stages",
                len(done),
                ", ".join(done) or "none",
                ", ".join(running) or "nothing",
            )
            raise
        finally:
            for proc, _, out in running.values():
                _stop_group(proc)
                out.close()
            bar.close()
    if failed:
        name = failed[0]
        path = log_dir / f"{name}.log"
        raise PipelineError(f"pipeline task {name} failed: {_cause(path)} (the whole log: {path})")
    return done


class PipelineError(RuntimeError):
    """A task of the pipeline failed; the message is its cause in one line and the path of its log."""


def _cause(log_path: Path) -> str:
    """The last exception line of a task's log (``SomeError: what went wrong``), or its exit in words."""
    pattern = re.compile(r"^(\w+\.)*\w*(Error|Exception|Diverged|Interrupt|Exit)\b.*")
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    found = [line for line in lines if pattern.match(line)]
    return found[-1].strip() if found else "it exited without an exception line"


def _stop_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Stop a task and every process it started (its process group): SIGTERM, then SIGKILL after ``grace`` s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def stop_on_sigterm():
    """Within it, SIGTERM (``kill <pid>``) stops the run as Ctrl-C does, so its cleanup runs: the processes it
    started are stopped and what finished is logged. Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def with_compute(params: Params, precision: str | None = None, threads: int | None = None) -> Params:
    """``params`` with ``compute.precision`` and ``compute.ssl_precision`` (resolved) and ``compute.threads``
    replaced where given."""
    from ..compute import resolve_precision

    compute = params.compute
    if precision:  # every network pass, SSL pre-training included
        resolved = resolve_precision(precision)
        compute = dataclasses.replace(compute, precision=resolved, ssl_precision=resolved)
    if threads:
        compute = dataclasses.replace(compute, threads=threads)
    return dataclasses.replace(params, compute=compute)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(paths.PARAMS_DIR / "cifar10.yaml"))
    parser.add_argument("--task", default=None, help="run one task in this process (what the scheduler starts)")
    parser.add_argument("--workers", type=int, default=None, help="tasks at once (default: one per core)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per task (default: 1 on a CPU)")
    parser.add_argument("--only", nargs="*", default=None, help="these tasks and what they need (default: all)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None, help="override the profile's")
    parser.add_argument("--variants", nargs="*", default=(), help="also these variants of the profile (its variants)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if args.task:
        import torch
        import torch.distributed as dist

        from ..notebook import setup

        if args.threads:
            torch.set_num_threads(args.threads)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: an SSL task trains across the ranks
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        params = with_compute(setup(args.params), args.precision, args.threads)
        with stop_on_sigterm():  # a stopped task removes its unfinished stage folder on the way out
            run_task(params, args.task, progress=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        return
    log_dir = paths.new_run_dir(paths.runs_dir() / "pipeline")
    result = run_all(
        Path(args.params), log_dir, args.workers, args.threads, True, args.only, args.precision, tuple(args.variants)
    )
    for name, info in result.items():
        print(f"{name}: {info['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
