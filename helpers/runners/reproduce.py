"""Runner: compute the expensive stages side by side, then execute every notebook in order with papermill
and regenerate ``figures/<profile>/``.

    python -m helpers.runners.reproduce --params params/cifar10.yaml [--data-root PATH] [--only 01_attack]

First ``helpers.runners.pipeline`` computes the SSL models and the defenses, several stages at once (one per core
on a CPU); the notebooks then find them in the cache (``--no-pipeline`` lets the notebooks compute them
one after another instead). The percent-format ``.py`` notebooks are the source; each executed copy goes
to ``runs/<profile>/<UTC time>/`` with the effective params beside it, and the figures and tables to
``runs/<profile>/<UTC time>/figures/``. At the end ``RECORD.md`` and ``record.json`` there record the
params, the commit, the minutes of every pipeline task, stage and notebook, and the wall time of the run.

``--publish`` (what ``make reproduce`` passes for the default profile, and only for it) writes the figures,
tables and record to the reference folder ``figures/<profile>/`` instead, the executed notebooks, with
their outputs, over the ``.ipynb`` pairs in ``notebooks/`` (``publish_notebook``), so that a reader on
GitHub sees every figure without running anything, and the README's results block from the new tables
(``publish_readme``). Any other run leaves all three untouched.

Before anything runs, the profile's shipped checkpoints (``figures/<profile>/checkpoints/``, see
``helpers.runners.checkpoints``) that match the params, code and data are verified and copied into the cache, so
that a fresh clone trains nothing. ``--retrain`` (``make reproduce RETRAIN=1``) installs none and computes
every stage again from nothing. If no data root exists and the dataset is CIFAR-10, it is downloaded first
(``helpers.runners.fetch``: the same files as the shared copy, checked by their manifest).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from .. import io, paths
from .. import params as params_mod

KERNEL_NAME = "python3"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"  # tqdm's bars in a notebook kernel
log = logging.getLogger("helpers.runners.reproduce")


def git_commit() -> str:
    """The checked-out commit, with ``-dirty`` when the work tree differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=paths.REPO_ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    # figures/ holds this run's own outputs: only changes to the code and params make a record dirty
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!figures")
    return commit + ("-dirty" if dirty else "")


def effective_params(params_path: Path, data_root: str | None, fetch: bool = True) -> params_mod.Params:
    """The params with the data root resolved. Where no root is named and none is found, CIFAR-10 is
    downloaded to ``data/cifar10`` (``fetch``); otherwise a missing root fails early, saying how to get it."""
    from ..paths import DataError

    p = params_mod.load(params_path)
    if data_root:
        p = dataclasses.replace(p, data=dataclasses.replace(p.data, root=data_root))
    try:
        return params_mod.with_resolved_root(p)
    except DataError as missing:
        if not (fetch and p.data.dataset == "cifar10" and not p.data.root and not os.environ.get(paths.DATA_ROOT_ENV)):
            raise
        from . import fetch as fetch_data

        target = paths.DEFAULT_DATA_ROOTS["cifar10"][-1]
        log.info("no CIFAR-10 found (%s): downloading it to %s", missing, target)
        try:
            fetch_data.fetch(target)
        except fetch_data.FetchError as e:
            raise DataError(f"{missing}; downloading it failed: {e}") from e
        return params_mod.with_resolved_root(p)


def run(
    params_path: Path,
    data_root: str | None = None,
    only: list[str] | None = None,
    progress: bool = True,
    pipeline: bool = True,
    publish: bool = False,
    retrain: bool = False,
) -> Path:
    started_unix, started = time.time(), time.perf_counter()
    commit = git_commit()  # before the run writes anything (a published run rewrites notebooks/*.ipynb)
    params = effective_params(params_path, data_root)
    notebooks = [nb for nb in paths.notebooks() if not only or any(nb.stem.startswith(o) for o in only)]
    if not notebooks:
        raise SystemExit(f"no notebook matches --only {only}")
    if publish and only:
        raise SystemExit("--publish runs every notebook: leave out --only")
    # The kernel must be this interpreter (the project's environment), whatever PATH says.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # Bars reach the terminal as logged lines: refresh them every few seconds, not ten times a second.
    os.environ.setdefault("TQDM_MININTERVAL", "3")
    run_dir = paths.new_run_dir(paths.runs_dir() / params.profile)
    output = run_dir / "figures"  # a published run too: its files replace figures/<profile>/'s only at the end
    from .. import cache
    from . import checkpoints

    # What the pipeline's processes and the notebooks' kernels inherit: where to write, the stage log, and
    # for a retrain the time before which every cached result counts as a miss.
    env = {paths.OUTPUT_ENV: str(output), cache.STAGE_LOG_ENV: None, cache.RECOMPUTE_ENV: None}
    if retrain:
        env[cache.RECOMPUTE_ENV] = str(started_unix)
    previous = {name: os.environ.get(name) for name in env}
    os.environ.update({k: v for k, v in env.items() if v is not None})
    for name in (k for k, v in env.items() if v is None):
        os.environ.pop(name, None)
    try:
        if retrain:
            log.info("--retrain: no shipped checkpoint is used; every stage is computed again")
            shipped = {"retrain": True}
        else:
            report = checkpoints.install(params)
            log.info(report.summary())
            shipped = {"installed": len(report.installed), "present": len(report.present), "refused": report.refused}
            shipped = shipped if checkpoints.read_manifest(params.profile) else {}
        timings, tasks = _execute(params, run_dir, notebooks, pipeline and not only, progress)
        wall = round(time.perf_counter() - started, 1)
        used = {f.stem: cache.stages_used(f) for f in sorted((run_dir / "stages").glob("*.jsonl"))}
        write_record(
            params,
            params_path,
            run_dir,
            timings,
            tasks,
            cache.computed_since(started_unix),
            wall,
            commit,
            used,
            shipped,
        )
        if publish:  # only now that every notebook ran: the figures, the record, the executed notebooks
            n = publish_files(output, paths.published_dir(params.profile))
            for source in notebooks:
                publish_notebook(run_dir / f"{source.stem}.ipynb", source.with_suffix(".ipynb"))
            log.info(
                "published %d files to %s and %d executed notebooks",
                n,
                paths.published_dir(params.profile),
                len(notebooks),
            )
            publish_readme(params.profile)
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return run_dir


def _execute(
    params: params_mod.Params, run_dir: Path, notebooks: list[Path], pipeline: bool, progress: bool
) -> tuple[dict[str, float], dict[str, dict]]:
    """Compute the stages (``helpers.runners.pipeline``), then execute ``notebooks`` into ``run_dir``."""
    import jupytext
    import papermill

    from ..cache import STAGE_LOG_ENV
    from . import pipeline as pipeline_mod

    effective = io.write_text(run_dir / "params.yaml", params_mod.dump(params))
    (run_dir / "stages").mkdir(exist_ok=True)  # which stages each part of the run looked up
    tasks = {}
    if pipeline:
        log.info("computing the stages side by side (logs: %s)", run_dir / "pipeline")
        os.environ[STAGE_LOG_ENV] = str(run_dir / "stages" / "pipeline.jsonl")
        variants, names = pipeline_mod.notebook_tasks(params.variants)
        tasks = pipeline_mod.run_all(effective, run_dir / "pipeline", progress=progress, only=names, variants=variants)
    timings = {}
    for source in notebooks:
        log.info("running %s (profile %s)", source.name, params.profile)
        os.environ[STAGE_LOG_ENV] = str(run_dir / "stages" / f"{source.stem}.jsonl")
        start = time.perf_counter()
        executed = run_dir / f"{source.stem}.ipynb"
        try:
            papermill.execute_notebook(
                jupytext.read(source),
                str(executed),
                parameters={"params_path": str(effective)},
                kernel_name=KERNEL_NAME,
                cwd=str(paths.NOTEBOOKS_DIR),
                progress_bar=progress,
                log_output=progress,
            )
        except papermill.PapermillExecutionError as e:
            cause = str(e.evalue).strip().splitlines()[-1] if str(e.evalue).strip() else ""
            raise NotebookError(
                f"notebook {source.name} failed: {e.ename}: {cause} (the traceback: {executed})"
            ) from None
        timings[source.stem] = round(time.perf_counter() - start, 1)
        log.info("%s done in %.1f s", source.name, timings[source.stem])
    return timings, tasks


class NotebookError(RuntimeError):
    """A notebook failed: its exception in one line and the executed notebook that holds the traceback."""


def publish_files(staged: Path, published: Path) -> int:
    """Move every file a run wrote under ``staged`` to the same place under ``published``, each replaced in
    one step; files the run did not write (the shipped checkpoints, the studies' tables) stay."""
    files = sorted(f for f in staged.rglob("*") if f.is_file())
    for f in files:
        target = published / f.relative_to(staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        io.atomic_write(target, lambda tmp, f=f: shutil.copyfile(f, tmp))
    return len(files)


def publish_readme(profile: str) -> bool:
    """Rewrite the README's results block from the tables just published (``report.readme_results``): only for
    the profile it shows, and only when they were published to the repository's own ``figures/``, which the
    README links to. Return whether the README changed."""
    from . import report

    if profile != report.README_PROFILE or paths.published_dir(profile) != paths.REPO_ROOT / "figures" / profile:
        return False
    changed = report.write_readme_results(profile)
    log.info("README.md: results block %s", "rewritten" if changed else "unchanged")
    return changed


def publish_notebook(executed: Path, pair: Path) -> None:
    """Write an executed notebook over its ``.ipynb`` pair with its outputs, as a reader should see it: the cell
    papermill injected (the run's temporary params path) removed, no progress-bar widgets (a static page
    cannot draw them: GitHub shows an error, the book would fetch their scripts from the network), and no
    per-run metadata (papermill's paths and timings), so that an unchanged result gives an unchanged file."""
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:03d}"  # stable: jupytext gives every read new random ids
        for key in ("papermill", "execution"):
            cell.metadata.pop(key, None)
        if not cell.metadata.get("tags", True):  # papermill's empty tag lists, which jupytext does not write
            cell.metadata.pop("tags")
        if cell.cell_type == "code":
            cell.execution_count = None
            cell.outputs = [o for o in cell.get("outputs", []) if WIDGET_MIME not in o.get("data", {})]
            for output in cell.outputs:
                if "execution_count" in output:
                    output["execution_count"] = None
    for key in ("papermill", "widgets"):
        nb.metadata.pop(key, None)
    io.write_text(pair, nbformat.writes(nb) + "\n")


def write_record(
    params: params_mod.Params,
    params_path: Path,
    run_dir: Path,
    timings: dict[str, float],
    tasks: dict[str, dict] | None = None,
    stages: list[dict] | None = None,
    wall_seconds: float | None = None,
    commit: str | None = None,
    used: dict[str, list[str]] | None = None,
    shipped: dict | None = None,
) -> None:
    import torch

    tasks, stages, used = tasks or {}, stages or [], used or {}
    figures = paths.figures_dir(params.profile)  # the run's output folder (helpers.runners.reproduce sets it)
    record = {
        "profile": params.profile,
        "params_file": str(Path(params_path).resolve().relative_to(paths.REPO_ROOT))
        if Path(params_path).resolve().is_relative_to(paths.REPO_ROOT)
        else str(params_path),
        "commit": commit or git_commit(),
        "finished_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_seconds": wall_seconds,
        "pipeline_task_seconds": {name: info["seconds"] for name, info in tasks.items()},
        "stage_seconds": [{"stage": d["stage"], "key": d["key"], "seconds": d["seconds"]} for d in stages],
        "notebook_seconds": timings,
        "stages_used": sorted({name for names in used.values() for name in names}),
        "notebook_stages": {name: names for name, names in used.items() if name != "pipeline"},
        "shipped_checkpoints": shipped or {},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
        },
        "run_dir": str(run_dir),
        "params": params.to_dict(),
    }
    io.write_json(figures / "record.json", record)
    lines = [
        f"# Record of profile `{params.profile}`",
        "",
        f"- params file: `{record['params_file']}` (the full effective params are below and in record.json)",
        f"- commit: `{record['commit']}`",
        f"- finished: {record['finished_utc']}",
        f"- machine: {record['machine']['platform']}, {record['machine']['cpus']} CPUs, torch "
        f"{record['machine']['torch']}, CUDA {'yes' if record['machine']['cuda'] else 'no'}",
        "",
        f"- precision: {params.compute.precision} (SSL pre-training: {params.compute.ssl_precision}); "
        "whole run (stages and notebooks): "
        + (f"{wall_seconds / 60:.1f} min" if wall_seconds is not None else "not measured"),
        f"- shipped checkpoints: {_shipped_line(shipped or {})}",
        "",
    ]
    if tasks:
        lines += [
            "Pipeline tasks, run side by side (wall minutes of each, cache hits included):",
            "",
            "| task | minutes |",
            "|---|---|",
            *[f"| {name} | {info['seconds'] / 60:.1f} |" for name, info in tasks.items()],
            "",
        ]
    if stages:
        lines += [
            "Stages computed in this run (compute minutes of each; the rest were cache hits):",
            "",
            "| stage | key | minutes |",
            "|---|---|---|",
            *[f"| {d['stage']} | {d['key']} | {d['seconds'] / 60:.1f} |" for d in stages],
            "",
        ]
    lines += [
        "| notebook | seconds |",
        "|---|---|",
        *[f"| {name} | {sec} |" for name, sec in timings.items()],
        "",
        "```yaml",
        params_mod.dump(params).rstrip(),
        "```",
        "",
    ]
    io.write_text(figures / "RECORD.md", "\n".join(lines))


def _shipped_line(shipped: dict) -> str:
    if shipped.get("retrain"):
        return "none used (--retrain: every stage computed again)"
    if not shipped:
        return "none for this profile"
    text = f"{shipped['installed']} stages installed into the cache, {shipped['present']} already there"
    return text + (f", refused: {', '.join(shipped['refused'])}" if shipped["refused"] else ", none refused")


# The notebooks of the GPU profile that read only the models and their probes (job J1 of helpers.runners.gpu)
GPU_MODEL_NOTEBOOKS = ("01", "02")


def gpu_refusal(next_job, only) -> str | None:
    """Why ``params/cifar10-gpu.yaml`` cannot run here yet (None when it can): its models train for days on a
    CPU and its defenses for hours, so only what the GPU queue has shipped runs. ``next_job``: the queue's
    next job (None when all are done); ``only``: the notebooks asked for."""
    from . import gpu

    defenses = next(i for i, job in enumerate(gpu.JOBS) if "defense_patchsearch_poisoned" in job.phases[0])
    if next_job is None or gpu.JOBS.index(next_job) > defenses:  # the models and both defenses are shipped
        return None
    shipped_models = next_job is not gpu.JOBS[0]
    if shipped_models and only and all(name.startswith(GPU_MODEL_NOTEBOOKS) for name in only):
        return None
    what = (
        "only the models are shipped (job J1), and the defenses take hours on this CPU: run the notebooks that "
        f'read the models alone (make reproduce PARAMS=params/cifar10-gpu.yaml ONLY="{" ".join(GPU_MODEL_NOTEBOOKS)}", '
        "about 10 minutes)"
        if shipped_models
        else "no GPU job has shipped its models yet, and training them on this CPU takes days"
    )
    return (
        f"params/cifar10-gpu.yaml: {what}; the GPU queue ships the rest (make gpu-status), or pass RETRAIN=1 to "
        "compute everything here anyway"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(paths.PARAMS_DIR / "cifar10.yaml"), help="params file (profile)")
    parser.add_argument(
        "--data-root",
        default=None,
        help=f"override data.root (else params, then ${paths.DATA_ROOT_ENV}, then the dataset's default place)",
    )
    parser.add_argument("--only", nargs="*", help="run only the notebooks whose names start with these")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or streamed cell output")
    parser.add_argument(
        "--no-pipeline", action="store_true", help="let the notebooks compute every stage, one after another"
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="use no shipped checkpoint and compute every stage again from nothing (make reproduce RETRAIN=1)",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="write figures/<profile>/ and the executed notebooks/*.ipynb (make reproduce: the default profile only)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    from . import gpu

    if Path(args.params).resolve() == gpu.PARAMS.resolve() and not args.retrain:
        refusal = gpu_refusal(gpu.next_job(gpu.read_manifest(params_mod.load(gpu.PARAMS).profile)), args.only)
        if refusal:
            raise SystemExit(refusal)
    from ..io import CheckpointError
    from ..paths import DataError
    from .pipeline import PipelineError, stop_on_sigterm

    try:
        with stop_on_sigterm():  # `kill <pid>` stops the workers and the notebook's kernel too
            run_dir = run(
                Path(args.params),
                args.data_root,
                args.only,
                not args.quiet,
                not args.no_pipeline,
                args.publish,
                args.retrain,
            )
    except (params_mod.ParamsError, ValueError, PipelineError, CheckpointError, DataError, NotebookError) as e:
        raise SystemExit(f"error: {e}") from None  # the cause in one line; the full log is named in it

    params = params_mod.load(args.params)
    figures = paths.published_dir(params.profile) if args.publish else run_dir / "figures"
    print(f"executed notebooks: {run_dir}{' and notebooks/' if args.publish else ''}\nfigures and tables: {figures}")


if __name__ == "__main__":
    main()
