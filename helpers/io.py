"""Atomic file writes: a reader never sees a half-written file, a crash never leaves one behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the process's umask, restored


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600: give the file the mode any new file gets
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def replace_dir(tmp: Path, final: Path) -> Path:
    """Put the finished folder ``tmp`` at ``final``; an older ``final`` is moved aside first, then removed, so
    that ``final`` is always either the old folder or the new one, never a mixture."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    return final


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    return atomic_write(path, lambda p: np.save(p, array))


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    def write(p: Path) -> None:
        with open(p, "wb") as f:  # a file object keeps numpy from appending another ".npz"
            np.savez(f, **arrays)

    return atomic_write(path, write)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely (not weights only, or not readable); names the file."""


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Weights as safetensors (no pickle: loading runs no code)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def save_state(path: str | Path, state: dict) -> Path:
    """A training state (state dicts of tensors, numbers and strings) for ``load_state``."""
    return atomic_write(path, lambda p: torch.save(state, p))


def load_state(path: str | Path, map_location="cpu") -> dict:
    """``torch.load(weights_only=True)``: tensors, numbers, strings and containers only. A file that carries
    any other pickled object is refused with an error naming it, never executed."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for foreign objects; RuntimeError and others for damaged files
        raise CheckpointError(
            f"{path}: refused to load: it is not a weights-only checkpoint (it holds a pickled object other "
            f"than tensors, numbers and containers, or is damaged): {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
