"""Stage cache: ``artifacts/<stage>/<hash of the params the stage reads>/``.

A stage's outputs are computed into a temporary folder and renamed into place only when complete,
with the params the stage read written beside them (``params.yaml``, the completion marker).
A killed computation leaves no half-written result; the next run simply recomputes it.

Two environment variables, set by ``helpers.runners.reproduce`` and inherited by its pipeline and notebook kernels:

- ``PATCHSEARCH_STAGE_LOG``: a file to which every stage lookup appends ``{"stage", "key", "hit"}`` (one JSON
  line): the run's record lists the stages it used, and ``helpers.runners.checkpoints`` ships them.
- ``PATCHSEARCH_RECOMPUTE_BEFORE``: a Unix time; a result finished before it counts as a miss and is computed
  again, then put in place of the old one (``make reproduce RETRAIN=1``: every stage from nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import io, paths
from .params import Params, key_of, stage_hash, stage_key_material, stage_params

log = logging.getLogger(__name__)

MARKER = "params.yaml"
STAGE_LOG_ENV = "PATCHSEARCH_STAGE_LOG"
RECOMPUTE_ENV = "PATCHSEARCH_RECOMPUTE_BEFORE"


@dataclass(frozen=True)
class StageResult:
    stage: str
    key: str
    path: Path
    hit: bool


def stage_dir(params: Params, stage: str) -> Path:
    return paths.artifacts_dir() / stage / stage_hash(params, stage)


def cached_result(stage: str, params: Params) -> StageResult | None:
    """The stage's finished folder where the cache holds one (recorded as used), else None: nothing computed."""
    key = stage_hash(params, stage)
    return _hit(stage, key, paths.artifacts_dir() / stage / key)


def _hit(stage: str, key: str, final: Path, why: str = "") -> StageResult | None:
    """The finished, fresh result at ``final``, logged and recorded as used; None where there is none."""
    if not (final / MARKER).is_file() or _stale(final):
        return None
    log.info("cache hit  %s/%s%s", stage, key, why)
    _log_use(stage, key, hit=True)
    return StageResult(stage, key, final, hit=True)


def cached_stage(stage: str, params: Params, compute: Callable[[Path, Path], None]) -> StageResult:
    """Return the stage's folder, calling ``compute(tmp_dir, final_dir)`` to fill ``tmp_dir`` on a miss.

    ``final_dir`` is where the folder will be once complete: file lists written by the stage name their
    files there (absolute paths, as SSL-Backdoor's loaders expect)."""
    material = stage_key_material(params, stage)  # built once: it hashes the data folder's manifest
    key = key_of(material)
    final = paths.artifacts_dir() / stage / key
    found = _hit(stage, key, final)
    if found:
        return found
    with stage_lock(final):  # one process computes a stage; the others wait here, then find it done
        found = _hit(stage, key, final, " (computed by another run while this one waited)")
        return found or _compute(stage, key, material, params, final, compute)


def partial_dir(final: Path) -> Path:
    """Where a resumable stage keeps its finished parts: ``<stage>/<key>.partial/`` beside its result."""
    return final.with_suffix(".partial")


def resumable_stage(stage: str, params: Params, compute: Callable[[Path, Path, Path], None]) -> StageResult:
    """``cached_stage`` for a stage that keeps its finished parts as it goes (an SSL training's checkpoints,
    each window side of a search, each member of a classifier ensemble): ``compute(tmp_dir, final_dir, work)``
    writes them in ``work`` (``partial_dir``), which outlives a stopped run, so the next one resumes there
    (``helpers.runners.gpu`` carries it to a GPU job's next try). It is removed once the stage is complete."""
    result = cached_stage(stage, params, lambda out, final: compute(out, final, partial_dir(final)))
    shutil.rmtree(partial_dir(result.path), ignore_errors=True)
    return result


@contextlib.contextmanager
def stage_lock(final: Path):
    """An exclusive lock on one stage result (``artifacts/.locks/<stage>-<key>``, held by ``flock``, so a
    killed holder frees it), waited for with a log line naming who holds it."""
    locks = paths.artifacts_dir() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{final.parent.name}-{final.name}", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            log.info(
                "waiting for %s/%s: another run is computing it (%s)",
                final.parent.name,
                final.name,
                handle.read().strip() or "pid unknown",
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compute(
    stage: str, key: str, material: dict, params: Params, final: Path, compute: Callable[[Path, Path], None]
) -> StageResult:
    log.info("cache miss %s/%s: computing", stage, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        start = time.perf_counter()
        compute(tmp, final)
        info = {
            "stage": stage,
            "key": key,
            "seconds": round(time.perf_counter() - start, 1),
            "finished_unix": round(time.time(), 1),
            "key_material": material,
        }
        (tmp / "stage.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / MARKER).write_text(yaml.safe_dump(stage_params(params, stage), sort_keys=True))
        if final.exists():  # an incomplete folder from an older crash, a concurrent run that won, or a recompute
            if (final / MARKER).is_file() and not _stale(final):
                shutil.rmtree(tmp)
                _log_use(stage, key, hit=True)
                return StageResult(stage, key, final, hit=True)
            if (final / MARKER).is_file():
                log.info("replacing %s/%s with the result computed again", stage, key)
            else:
                log.warning("replacing the unfinished %s/%s left by an interrupted run", stage, key)
        io.replace_dir(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        message = str(e.args[0]) if e.args else ""
        if getattr(e, "names_stage", False) and not message.startswith("stage "):  # the innermost stage that failed
            e.args = (f"stage {stage} ({params.profile}): {message}", *e.args[1:])
        raise
    _log_use(stage, key, hit=False)
    return StageResult(stage, key, final, hit=False)


def clean_abandoned() -> list[str]:
    """Remove the temporary folders (``<stage>/.tmp-<key>-<pid>-...``) of runs that are no longer running
    (killed, crashed); returns a line for each, with its age. A live run's folders are left alone."""
    removed = []
    for tmp in sorted(paths.artifacts_dir().glob("*/.tmp-*")):
        try:
            pid = int(tmp.name.split("-")[2])
            os.kill(pid, 0)  # still running: its stage is being computed
            continue
        except (IndexError, ValueError, ProcessLookupError):
            pass
        except PermissionError:  # someone else's live process
            continue
        age = (time.time() - tmp.stat().st_mtime) / 3600
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(f"{tmp.parent.name}/{tmp.name} ({age:.1f} h old)")
    return removed


def _stale(folder: Path) -> bool:
    """A result finished before ``$PATCHSEARCH_RECOMPUTE_BEFORE`` (a run that retrains everything)."""
    before = os.environ.get(RECOMPUTE_ENV)
    if not before:
        return False
    try:
        finished = json.loads((folder / "stage.json").read_text()).get("finished_unix", 0)
    except (OSError, json.JSONDecodeError):
        return True
    return finished < float(before)


def _log_use(stage: str, key: str, hit: bool) -> None:
    path = os.environ.get(STAGE_LOG_ENV)
    if path:
        with open(path, "a") as f:  # one short line per write: appends from several processes do not interleave
            f.write(json.dumps({"stage": stage, "key": key, "hit": hit}) + "\n")


def stages_used(log_path: Path, computed_only: bool = False) -> list[str]:
    """``stage/key`` of every stage a run looked up (``$PATCHSEARCH_STAGE_LOG``), in first-use order; with
    ``computed_only``, those it computed (not found in the cache)."""
    seen: dict[str, None] = {}
    if Path(log_path).is_file():
        for line in Path(log_path).read_text().splitlines():
            entry = json.loads(line)
            if not (computed_only and entry["hit"]):
                seen.setdefault(f"{entry['stage']}/{entry['key']}", None)
    return list(seen)


def computed_since(since_unix: float) -> list[dict]:
    """``stage.json`` of every stage result finished after ``since_unix`` (the runner's timings)."""
    root = paths.artifacts_dir()
    found = []
    for info in root.glob("*/*/stage.json") if root.is_dir() else []:
        data = json.loads(info.read_text())
        if data.get("finished_unix", 0) >= since_unix:
            found.append(data)
    return sorted(found, key=lambda d: d["finished_unix"])


def clean(dry_run: bool = False) -> list[Path]:
    """Remove the whole artifacts folder, first listing every stage result in it (and unfinished work)."""
    root = paths.artifacts_dir()
    entries = sorted(p for p in root.glob("*/*") if p.is_dir()) if root.is_dir() else []
    for entry in entries:
        done = "complete" if (entry / MARKER).is_file() else "unfinished"
        print(f"{'would remove' if dry_run else 'removing'} {entry.relative_to(root.parent)} ({done})")
    if not entries:
        print(f"nothing to remove under {root}")
    if not dry_run and root.is_dir():
        shutil.rmtree(root)
    return entries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The stage cache: list or remove cached stage results.")
    parser.add_argument("--clean", action="store_true", help="remove every cached result, listing each")
    parser.add_argument("--dry-run", action="store_true", help="only list what --clean would remove")
    args = parser.parse_args(argv)
    clean(dry_run=args.dry_run or not args.clean)


if __name__ == "__main__":
    main()
