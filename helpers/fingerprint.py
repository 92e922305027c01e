"""What a cached stage's result depends on besides its params: the code it runs and the files it reads.

- **Code.** ``STAGE_CODE`` lists, for every stage, the ``helpers`` modules whose code computes its result,
  the upstream stages' modules included (as ``params.STAGE_INPUTS`` does for params; both come from the
  stage's declaration in ``helpers.stages``). A stage's key holds
  the *identity* of each of those modules, read from the committed lock ``helpers/code.lock.json``, not
  the code itself: a key needs no parsing, no torch, and is the same on every Python version.
  The lock also holds each module's *source* fingerprint (its syntax tree with docstrings removed,
  written as Python 3.11's ``ast.dump`` writes it, whatever Python runs: ``dump_tree``), so comments,
  docstrings and layout never count. ``tests/test_code_lock.py`` fails when a module's code has moved
  from its lock entry, until one of two commands records it:
  ``python -m helpers.runners.codelock bump <module>`` when its results change (a new identity: every stage
  that runs it is computed again), or ``python -m helpers.runners.codelock renew <module>``, which first proves
  the smoke profile's stage outputs unchanged, bit for bit, by running them with the committed code and
  with yours (``helpers.runners.codelock``), and keeps the identity (refactors, renames, a path that only another
  machine takes: shipped results stay valid).
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
import json
import os
from pathlib import Path

from . import stages

PACKAGE_DIR = Path(__file__).resolve().parent

# Modules that never change a stage's numbers: file plumbing, paths, params parsing, the cache itself, figures,
# the notebooks' setup, the stage registry and this module. The runners (``helpers.runners``) and the side
# studies (``helpers.studies``) are sub-packages that no stage module imports (``tests/test_stages.py``).
NOT_RESULT_CODE = frozenset(
    {"__init__", "cache", "fingerprint", "io", "params", "paths", "plotting", "notebook", "stages", "paper"}
)
SUBPACKAGES = ("runners", "studies")

# For every stage, the modules whose code computes its result, its upstream stages' included: declared in
# ``helpers.stages`` with the stage itself.
STAGE_CODE: dict[str, tuple[str, ...]] = {s.name: stages.code(s.name) for s in stages.STAGES}


LOCK_NAME = "code.lock.json"
# Fields that Pythons after 3.11 added to nodes 3.11 already had (3.12: PEP 695's type parameters): left out
# so that the same source has the same fingerprint on 3.11, 3.12 and 3.13.
LATER_FIELDS = frozenset({"type_params"})


def dump_tree(node: object) -> str:
    """``ast.dump(node, annotate_fields=False)`` exactly as Python 3.11 writes it, on any Python: 3.12 adds
    ``type_params`` to every function and class, 3.13 leaves out empty fields; neither is code."""
    if isinstance(node, ast.AST):
        cls, args, keywords = type(node), [], False
        for name in node._fields:
            if name in LATER_FIELDS:
                continue
            try:
                value = getattr(node, name)
            except AttributeError:
                keywords = True
                continue
            if value is None and getattr(cls, name, ...) is None:  # an optional field left out (3.11's rule)
                keywords = True
                continue
            text = dump_tree(value)
            args.append(f"{name}={text}" if keywords else text)
        return f"{cls.__name__}({', '.join(args)})"
    if isinstance(node, list):
        return f"[{', '.join(dump_tree(x) for x in node)}]"
    return repr(node)


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
    return hashlib.sha256(dump_tree(tree).encode()).hexdigest()


def module_fingerprint(name: str, package_dir: Path | None = None) -> str:
    path = (package_dir or PACKAGE_DIR) / f"{name}.py"
    st = path.stat()
    return _file_source_fingerprint(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=256)
def _file_source_fingerprint(path: str, mtime_ns: int, size: int) -> str:
    return source_fingerprint(Path(path).read_text())


def result_modules() -> list[str]:
    """The modules whose code computes some stage's result: the ones the lock holds (retired ones included)."""
    return sorted({name for modules in STAGE_CODE.values() for name in modules})


def source_modules() -> list[str]:
    """The result modules that are files of the package (not retired into others)."""
    return [name for name in result_modules() if _exists(name)]


def lock_path(package_dir: Path | None = None) -> Path:
    return (package_dir or PACKAGE_DIR) / LOCK_NAME


def read_lock(package_dir: Path | None = None) -> dict:
    path = lock_path(package_dir)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: the code lock is missing; restore it with `git checkout -- {path}`") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); restore it with `git checkout -- {path}`") from e


def _entry(modules: dict, name: str, package_dir: Path | None) -> dict:
    if name not in modules:
        raise KeyError(
            f"helpers/{name}.py is not in {lock_path(package_dir)}: record it with "
            f"`python -m helpers.runners.codelock bump {name}`"
        )
    return modules[name]


def key_name(entry: dict, name: str) -> str:
    """The name under which a module's identity enters keys: the one it had when the identity was recorded
    (a renamed module keeps its old name there: ``python -m helpers.runners.codelock rename``)."""
    return entry.get("key_name", name)


def code_fingerprint(stage: str, package_dir: Path | None = None) -> str:
    """One hash of the identities of every module that ``stage`` runs (its own and its upstream stages')."""
    if stage not in STAGE_CODE:
        raise KeyError(f"unknown stage '{stage}' (known: {', '.join(STAGE_CODE)})")
    modules = read_lock(package_dir)["modules"]
    entries = {name: _entry(modules, name, package_dir) for name in STAGE_CODE[stage]}
    keys = sorted((key_name(entry, name), entry["identity"]) for name, entry in entries.items())
    parts = [f"{key}:{identity}" for key, identity in keys]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _exists(name: str, package_dir: Path | None = None) -> bool:
    return ((package_dir or PACKAGE_DIR) / f"{name}.py").is_file()


def moved_modules(package_dir: Path | None = None) -> dict[str, str]:
    """Result modules whose code differs from their lock entry, each with what differs. A module merged into
    others (``stages.retired``) has no file: its entry must say so (a renewal records it)."""
    modules, out = read_lock(package_dir)["modules"], {}
    for name in result_modules():
        if name not in modules:
            out[name] = "not in the lock"
        elif not _exists(name, package_dir):
            if not modules[name].get("retired"):
                out[name] = "its file is gone: renew it (proves its stages' results unchanged) to retire it"
        elif modules[name].get("retired"):
            out[name] = "retired in the lock, but its file exists"
        elif module_fingerprint(name, package_dir) != modules[name]["source"]:
            out[name] = "its code changed since the lock"
    for name in sorted(set(modules) - set(result_modules())):
        out[name] = "in the lock but no stage runs it"
    return out


def rename_in_lock(old: str, new: str, package_dir: Path | None = None) -> dict:
    """Move module ``old``'s lock entry to ``new`` (a module renamed): its identity and the name under which
    that identity enters keys stay, so no key changes; its code must then be renewed (proved unchanged)."""
    lock = read_lock(package_dir)
    modules = lock["modules"]
    if old not in modules:
        raise KeyError(f"{old} is not in {lock_path(package_dir)} (it holds: {', '.join(modules)})")
    if new in modules:
        raise KeyError(f"{new} is already in {lock_path(package_dir)}")
    if new not in result_modules():
        raise KeyError(f"no stage runs a module {new}: declare it in helpers/stages.py first")
    entry = modules.pop(old)
    modules[new] = {"identity": entry["identity"], "source": entry["source"], "key_name": key_name(entry, old)}
    return _write(lock, modules, package_dir)


def _write(lock: dict, modules: dict, package_dir: Path | None) -> dict:
    lock["modules"] = dict(sorted(modules.items()))
    path = lock_path(package_dir)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(lock, indent=2) + "\n")
    os.replace(tmp, path)
    return lock


def write_lock(names: list[str], new_identity: bool, package_dir: Path | None = None, proof: str = "") -> dict:
    """Record the current code of ``names`` in the lock: with ``new_identity`` (a bump) their identity becomes
    their code's fingerprint, so every stage that runs them misses the cache; without (a renewal, proved by
    ``helpers.runners.codelock``) the identity stays and shipped results stay valid."""
    lock = read_lock(package_dir)
    modules = lock["modules"]
    unknown = [name for name in names if name not in result_modules()]
    if unknown:
        raise KeyError(f"not a module any stage runs: {', '.join(unknown)} (they are: {', '.join(result_modules())})")
    for name in names:
        if not _exists(name, package_dir):  # merged into other modules: the identity stays, nothing to read
            if new_identity or name not in modules:
                raise KeyError(f"helpers/{name}.py does not exist: only a recorded module can be retired (renew)")
            kept = {k: v for k, v in modules[name].items() if k in ("identity", "key_name")}
            modules[name] = {**kept, "source": None, "retired": True}
            if proof:
                modules[name]["renewed_by"] = proof
            continue
        source = module_fingerprint(name, package_dir)
        if new_identity or name not in modules:
            modules[name] = {"identity": source, "source": source}  # a new identity enters keys by its name
        else:
            modules[name] = {**modules[name], "source": source}
        if proof and not new_identity:
            modules[name]["renewed_by"] = proof
    for name in set(modules) - set(result_modules()):
        del modules[name]
    return _write(lock, modules, package_dir)


def helpers_imports(name: str, package_dir: Path | None = None, top_level_only: bool = False) -> set[str]:
    """The ``helpers`` modules that module ``name`` imports (relative imports); with ``top_level_only``,
    those at module level (an import inside a function serves another stage: ``evaluate`` imports
    ``classify`` only to retrain a model on a defense's filtered list, the ``ssl_filtered`` stage)."""
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
def _digests(root: str, splits: tuple[str, ...], stamp: tuple) -> dict[str, str]:
    out = {}
    for split in splits:
        base = os.path.join(root, split)
        for folder, dirs, files in os.walk(base):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def data_digests(root: str | Path, splits: tuple[str, ...]) -> dict[str, str]:
    """The sha256 of every file under ``root/<split>``, by its path relative to ``root`` (in walk order)."""
    stamp = tuple(_tree_stamp(Path(root) / split) for split in splits)
    return _digests(str(root), tuple(splits), stamp)


def data_manifest(root: str | Path, splits: tuple[str, ...]) -> str:
    """Hash of the relative path and content of every file under ``root/<split>``."""
    digest = hashlib.sha256()
    for rel, content in data_digests(root, splits).items():
        digest.update(f"{rel}\0{content}\n".encode())
    return digest.hexdigest()[:16]


def data_differences(expected: dict[str, str], root: str | Path, splits: tuple[str, ...], first: int = 5) -> str:
    """In words, how the files under ``root`` differ from ``expected`` (relative path -> a prefix of its
    sha256): the first ``first`` files changed, missing or added, and how many in all."""
    found = data_digests(root, splits)
    changed = [rel for rel, sha in expected.items() if rel in found and not found[rel].startswith(sha)]
    missing = [rel for rel in expected if rel not in found]
    added = [rel for rel in found if rel not in expected]
    parts = [
        f"{len(names)} {what} ({', '.join(names[:first])}{', ...' if len(names) > first else ''})"
        for what, names in (("changed", changed), ("missing", missing), ("added", added))
        if names
    ]
    return "; ".join(parts) or "no file differs (the data root or the splits differ)"


def _tree_stamp(split_dir: Path) -> tuple:
    """Modification times of a split's folders, the guard of the in-process memo of ``_digests`` (4 s for
    CIFAR-10): adding, removing or renaming a file changes its folder's time and so the manifest; a file
    edited in place is seen by the next process (each notebook, each run), not by one that has already
    hashed the folder."""
    if not split_dir.is_dir():
        return ()
    return (os.stat(split_dir).st_mtime_ns, *(entry.stat().st_mtime_ns for entry in os.scandir(split_dir)))
