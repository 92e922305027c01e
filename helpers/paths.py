"""Every path the project uses, in one place.

Environment variables override the defaults so that tests, CI and users can redirect output:

- ``PATCHSEARCH_DATA_ROOT``: the data root (a folder with ``train/`` and ``test/`` ImageFolder splits),
  used when the params file leaves ``data.root`` empty.
- ``PATCHSEARCH_ARTIFACTS``: where cached stage results go (default ``<repo>/artifacts``).
- ``PATCHSEARCH_FIGURES``: where the published reference figures and tables are (default ``<repo>/figures``).
- ``PATCHSEARCH_RUNS``: where executed notebooks and a run's own figures go (default ``<repo>/runs``).
- ``PATCHSEARCH_OUTPUT``: the folder a notebook writes its figures and tables to (``figures_dir``); set by
  ``helpers.runners.reproduce`` for each run.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
README = REPO_ROOT / "README.md"
PARAMS_DIR = REPO_ROOT / "params"

DATA_ROOT_ENV = "PATCHSEARCH_DATA_ROOT"


class DataError(ValueError):
    """Missing or malformed input data; the message names the path (and line) at fault. Defined here, the
    lowest module, because both the params (a data root that does not exist) and the data layer raise it."""


# Where a data set is looked for when neither the params file nor the environment names a root:
# the shared read-only copy beside the checkout first, then what `make data` writes inside it.
DEFAULT_DATA_ROOTS = {
    "cifar10": [REPO_ROOT.parent / "shared" / "data" / "cifar10", REPO_ROOT / "data" / "cifar10"],
    "imagenet100": [REPO_ROOT / "data" / "imagenet100"],
}

HOW_TO_GET_DATA = {
    "cifar10": "run `make data` (downloads CIFAR-10 as JPEG files in the ImageFolder layout to data/cifar10; "
    "`make reproduce` does it itself), or point data.root / $PATCHSEARCH_DATA_ROOT at an existing copy",
    "imagenet100": "build ImageNet-100 from ImageNet with UMBCvision/SSL-Backdoor's "
    "scripts/create_imagenet_subset.py (train/ and val/ class folders), then set data.root or "
    "$PATCHSEARCH_DATA_ROOT to it",
}


def _env_dir(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else default


def artifacts_dir() -> Path:
    return _env_dir("PATCHSEARCH_ARTIFACTS", REPO_ROOT / "artifacts")


OUTPUT_ENV = "PATCHSEARCH_OUTPUT"


def published_dir(profile: str) -> Path:
    """The profile's reference figures and tables, ``figures/<profile>/``: refreshed only by ``make reproduce``
    of the default profile (``helpers.runners.reproduce --publish``) and by the runners' ``--publish``."""
    return _env_dir("PATCHSEARCH_FIGURES", REPO_ROOT / "figures") / profile


def figures_dir(profile: str) -> Path:
    """Where a notebook writes its figures and tables: ``$PATCHSEARCH_OUTPUT`` when ``helpers.runners.reproduce``
    runs it (the run's own folder, or ``published_dir`` when it publishes), else ``runs/<profile>/figures/``, so
    that a reader who edits a parameter or runs another profile never overwrites the reference."""
    value = os.environ.get(OUTPUT_ENV)
    return Path(value).expanduser().resolve() if value else runs_dir() / profile / "figures"


def runs_dir() -> Path:
    return _env_dir("PATCHSEARCH_RUNS", REPO_ROOT / "runs")


def notebooks() -> list[Path]:
    """The pipeline's notebooks (percent-format sources) in execution order."""
    return sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py"))


def repo_relative(path: str | Path) -> str:
    """A path to use on another machine with this repository: relative to it when inside, else as it is."""
    path = Path(path)
    return str(path.relative_to(REPO_ROOT)) if path.is_absolute() and path.is_relative_to(REPO_ROOT) else str(path)


def shown(path: str | Path) -> str:
    """A path as a notebook prints it, the same on every machine: relative to the repository when inside it,
    else its last two parts after ``…/`` (a data root elsewhere: ``…/data/cifar10``). For display only:
    a path a program reads back is ``repo_relative``."""
    path = Path(path)
    if not path.is_absolute() or path.is_relative_to(REPO_ROOT):
        return repo_relative(path)
    return str(Path("…", *path.parts[-2:]))


def new_run_dir(parent: Path) -> Path:
    """A folder of its own for one run under ``parent``: named by the UTC time, with ``-2``, ``-3``... where
    another run started in the same second (made atomically: two runs never share one)."""
    from datetime import UTC, datetime

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"{parent}: 999 runs started in the same second")
