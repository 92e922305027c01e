import os

os.environ.setdefault("TQDM_DISABLE", "1")  # quiet progress bars in tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at test time
os.environ.setdefault("MPLBACKEND", "agg")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from helpers import params as params_mod  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_outputs(tmp_path, monkeypatch):
    """Every test writes artifacts, figures and runs under its own temporary folder."""
    for name in ("ARTIFACTS", "FIGURES", "RUNS"):
        monkeypatch.setenv(f"PATCHSEARCH_{name}", str(tmp_path / name.lower()))
    monkeypatch.delenv("PATCHSEARCH_DATA_ROOT", raising=False)


def make_image_folder(root: Path, classes=("cat", "dog", "frog"), per_class=(8, 6, 4), size=(16, 16), seed=0):
    """A tiny ImageFolder data set of random-noise PNGs: ``root/<class>/<n>.png``."""
    rng = np.random.default_rng(seed)
    for name, count in zip(classes, per_class, strict=True):
        (root / name).mkdir(parents=True)
        for n in range(count):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{n:03d}.png")
    return root


@pytest.fixture
def tiny_root(tmp_path):
    root = tmp_path / "tiny"
    make_image_folder(root / "train", per_class=(8, 10, 6), size=(20, 20), seed=1)
    make_image_folder(root / "test", per_class=(3, 3, 3), size=(20, 20), seed=2)
    return root


@pytest.fixture
def tiny_params(tiny_root):
    raw = {
        "profile": "tiny",
        "data": {"root": str(tiny_root)},
        "attack": {"target_class": "dog", "poison_rate": 0.5, "trigger_size": 0.25, "seed": 3},
    }
    return params_mod.with_resolved_root(params_mod.from_dict(raw, "tiny"))
