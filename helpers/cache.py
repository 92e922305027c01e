"""Stage cache: ``artifacts/<stage>/<hash of the params the stage reads>/``.

A stage's outputs are computed into a temporary folder and renamed into place only when complete,
with the params the stage read written beside them (``params.yaml``, the completion marker).
A killed computation leaves no half-written result; the next run simply recomputes it.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import paths
from .params import Params, stage_hash, stage_params

log = logging.getLogger(__name__)

MARKER = "params.yaml"


@dataclass(frozen=True)
class StageResult:
    stage: str
    key: str
    path: Path
    hit: bool


def stage_dir(params: Params, stage: str) -> Path:
    return paths.artifacts_dir() / stage / stage_hash(params, stage)


def cached_stage(stage: str, params: Params, compute: Callable[[Path, Path], None]) -> StageResult:
    """Return the stage's folder, calling ``compute(tmp_dir, final_dir)`` to fill ``tmp_dir`` on a miss.

    ``final_dir`` is where the folder will be once complete: file lists written by the stage name their
    files there (absolute paths, as SSL-Backdoor's loaders expect)."""
    final = stage_dir(params, stage)
    key = final.name
    if (final / MARKER).is_file():
        log.info("cache hit  %s/%s", stage, key)
        return StageResult(stage, key, final, hit=True)
    log.info("cache miss %s/%s: computing", stage, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        compute(tmp, final)
        (tmp / MARKER).write_text(yaml.safe_dump(stage_params(params, stage), sort_keys=True))
        if final.exists():  # an incomplete folder from an older crash, or a concurrent run that won
            if (final / MARKER).is_file():
                shutil.rmtree(tmp)
                return StageResult(stage, key, final, hit=True)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return StageResult(stage, key, final, hit=False)
