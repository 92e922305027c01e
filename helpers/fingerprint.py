"""What a cached stage's result depends on besides its params: the code it runs and the files it reads.

- **Code.** ``STAGE_CODE`` lists, for every stage, the ``helpers`` modules whose code computes its result,
  the upstream stages' modules included (as ``params.STAGE_INPUTS`` does for params). A module's
  fingerprint hashes its syntax tree with docstrings removed: editing the code changes it; editing a
  comment, a docstring or the layout does not, nor does any change to notebooks, plotting or docs.
  ``tests/test_fingerprint.py`` checks that every module a stage's modules import is either listed for
  that stage or declared as not computing results (``NOT_RESULT_CODE``), so a forgotten dependency fails
  a test instead of serving a stale artifact.
- **Files.** A trigger PNG enters the key by its content (a copy elsewhere hits, an in-place edit misses);
  the data folder by a manifest of its files' relative paths and contents. Modification times are left
  out: a data folder extracted again (each new machine, each session here) is the same data and must hit
  the cache; hashing CIFAR-10's 60,000 files costs about 4 s once per process.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent

# Modules that never change a stage's numbers: file plumbing, paths, params parsing, the cache itself,
# figures, the runners, the benchmark and this module.
NOT_RESULT_CODE = frozenset(
    {
        "__init__",
        "cache",
        "fingerprint",
        "io",
        "params",
        "paths",
        "plotting",
        "notebook",
        "reproduce",
        "pipeline",
        "bench",
        "study",
        "generality",
        "removal_study",
        "precision_study",
        "fetch_data",
        "checkpoints",
        "heldout",
    }
)

_DATA = ("data",)
_ATTACK = (*_DATA, "attack", "kernels")
_SSL = (*_ATTACK, "compute", "augment", "models", "ssl", "train")
_EVAL = (*_SSL, "cam", "evaluate")
_DEFENSE = (*_EVAL, "cluster", "search", "poison_classifier", "defense")

STAGE_CODE: dict[str, tuple[str, ...]] = {
    "data": _DATA,
    "attack": _ATTACK,
    "ssl_clean": _SSL,
    "ssl_poisoned": _SSL,
    "eval_clean": _EVAL,
    "eval_poisoned": _EVAL,
    "cluster_poisoned": _DEFENSE,
    "cluster_clean": _DEFENSE,
    "search_poisoned": _DEFENSE,
    "search_clean": _DEFENSE,
    "classifier_poisoned": _DEFENSE,
    "classifier_clean": _DEFENSE,
    "ssl_filtered": _DEFENSE,
    "eval_filtered": _DEFENSE,
    "potency_clean": (*_DEFENSE, "potency"),
    # notebook 08: the rest of the paper, each in a module of its own
    "kd_student": (*_SSL, "loop", "kd"),
    "eval_kd": (*_EVAL, "loop", "kd", "assess"),
    "ssl_mix": (*_SSL, "loop", "mixing"),
    "eval_mix": (*_EVAL, "loop", "mixing", "assess"),
    "ssl_clean_filtered": (*_DEFENSE, "loop", "retrain"),
    "eval_clean_filtered": (*_DEFENSE, "loop", "retrain", "assess"),
    "finetune_clean": (*_DEFENSE, "finetune"),
    "finetune_poisoned": (*_DEFENSE, "finetune"),
    "finetune_filtered": (*_DEFENSE, "finetune"),
}


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return tree


def source_fingerprint(source: str) -> str:
    """Hash of Python source as code: comments, docstrings and formatting do not count."""
    tree = _strip_docstrings(ast.parse(source))
    return hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()


def module_fingerprint(name: str, package_dir: Path | None = None) -> str:
    path = (package_dir or PACKAGE_DIR) / f"{name}.py"
    st = path.stat()
    return _file_source_fingerprint(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=256)
def _file_source_fingerprint(path: str, mtime_ns: int, size: int) -> str:
    return source_fingerprint(Path(path).read_text())


def code_fingerprint(stage: str, package_dir: Path | None = None) -> str:
    """One hash of the code of every module that ``stage`` runs (its own and its upstream stages')."""
    if stage not in STAGE_CODE:
        raise KeyError(f"unknown stage '{stage}' (known: {', '.join(STAGE_CODE)})")
    parts = [f"{name}:{module_fingerprint(name, package_dir)}" for name in sorted(STAGE_CODE[stage])]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def helpers_imports(name: str, package_dir: Path | None = None, top_level_only: bool = False) -> set[str]:
    """The ``helpers`` modules that module ``name`` imports (relative imports); with ``top_level_only``,
    those at module level (an import inside a function serves another stage: ``train`` imports
    ``defense`` only to retrain on a defense's filtered list, the ``ssl_filtered`` stage)."""
    tree = ast.parse(((package_dir or PACKAGE_DIR) / f"{name}.py").read_text())
    found = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import io, paths
                found.update(alias.name for alias in node.names)
    return found


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _manifest(root: str, splits: tuple[str, ...], stamp: tuple) -> str:
    digest = hashlib.sha256()
    for split in splits:
        base = os.path.join(root, split)
        for folder, dirs, files in os.walk(base):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
                digest.update(f"{os.path.relpath(path, root)}\0{content}\n".encode())
    return digest.hexdigest()[:16]


def data_manifest(root: str | Path, splits: tuple[str, ...]) -> str:
    """Hash of the relative path and content of every file under ``root/<split>``."""
    stamp = tuple(_tree_stamp(Path(root) / split) for split in splits)
    return _manifest(str(root), tuple(splits), stamp)


def _tree_stamp(split_dir: Path) -> tuple:
    """Modification times of a split's folders, the guard of the in-process memo of ``_manifest`` (4 s for
    CIFAR-10): adding, removing or renaming a file changes its folder's time and so the manifest; a file
    edited in place is seen by the next process (each notebook, each run), not by one that has already
    hashed the folder."""
    if not split_dir.is_dir():
        return ()
    return (os.stat(split_dir).st_mtime_ns, *(entry.stat().st_mtime_ns for entry in os.scandir(split_dir)))
