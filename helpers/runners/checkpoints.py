"""Shipped checkpoints: the default profile's expensive stage results, committed in the repository, so that
``make reproduce`` on a fresh clone regenerates every figure and table in minutes instead of hours.

    figures/<profile>/checkpoints/
        MANIFEST.json       every shipped stage: its key, the params it read, the key material (params with
                            the data replaced by a manifest of its files, and the code's fingerprint), the
                            commit of the run that used it, its compute time, and the sha256 of every file
        <stage>/<key>/...   the stage's files, as the cache holds them, with three differences:
                            - the backbones of the models that only the shipped evaluations read (i-CutMix,
                              retrained on a filtered list) are stored in fp16 (half the bytes; they load
                              into fp32); the clean and the backdoored model, which notebooks 02-05 run
                              live (the clustering recomputed from them must match the shipped searches),
                              stay exact;
                            - ``features.npz`` of an evaluation is left out (29 MB each; nothing reads it);
                            - absolute paths in text files (file lists, scores, params) are written as
                              ``@DATA_ROOT@`` and ``@ARTIFACTS@`` and restored for this machine on install.

Only what the notebooks need to skip training is shipped: the SSL models, the clustering the notebooks read
(03 draws it, 05 replays the search on it), the searches, the poison classifiers, the evaluations, the
potency scores and notebook 08's finetunings (``SHIPPED_STAGES``). The data and the attack are recomputed
on the spot in seconds. The
clustering is cheap too, but recomputed it would be the shipped one only where the features are bit-equal,
and bf16 features are not across CPUs (oneDNN's AMX kernels round otherwise, ``helpers/__init__.py``) nor
between a CPU and a GPU: a notebook replaying a shipped search on another clustering would score other
images. Its features are left out (``DROPPED_ARRAYS``: 10,000 x 256 floats a clustering; notebook 03
extracts them itself).

**Install** (``install``, which ``make reproduce`` and every notebook's ``setup`` call): for each shipped
stage, the key is recomputed from *your* params, code and data. If it equals the shipped key, every file's
sha256 is checked against the manifest (a mismatch is refused with ``CheckpointError``, naming the file)
and the stage is copied into the cache, atomically. If it differs, the shipped result is not the one your
run asks for: it is refused, the reason is reported (which params, which code or which data differ) and
the stage is computed as usual. Stages already in your cache are left alone.

**Retrain everything**: ``make reproduce RETRAIN=1`` (``helpers.runners.reproduce --retrain``) installs nothing
and recomputes every stage of the run, cached or not (``cache.RECOMPUTE_ENV``).

**Ship** (maintainers, after a published ``make reproduce`` whose record lists the stages it used):

    python -m helpers.runners.checkpoints ship      # figures/cifar10/record.json -> figures/cifar10/checkpoints/
    python -m helpers.runners.checkpoints verify    # hashes and keys against this checkout, as install does

``tests/test_checkpoints.py`` checks that the shipped keys are the ones the committed code computes, so
that a change which alters a stage's results cannot land without shipping its new results.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import shutil
import subprocess
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .. import io, paths, stages
from ..fingerprint import data_differences, data_digests, file_fingerprint
from ..io import CheckpointError
from ..params import ADDED_LATER, ONE_METHOD, Params, from_dict, key_of, stage_key_material, with_overrides

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
SHIPPED_STAGES = frozenset(s.name for s in stages.STAGES if s.shipped)  # helpers.stages says which
LEFT_OUT = frozenset({"features.npz"})  # evaluation features: 29 MB each, read by nothing
DROPPED_ARRAYS = {"clustering.npz": ("features",)}  # a clustering's features: notebook 03 extracts them itself
HALF_PRECISION = frozenset({"backbone.safetensors"})  # except for the EXACT_MODELS
EXACT_MODELS = ("ssl_clean", "ssl_poisoned")  # with the profile's own params (no variant): run live by 02-05
TEXT_SUFFIXES = frozenset({".txt", ".csv", ".yaml", ".json"})
DATA_TOKEN, ARTIFACTS_TOKEN = "@DATA_ROOT@", "@ARTIFACTS@"


def shipped_dir(profile: str) -> Path:
    return paths.published_dir(profile) / "checkpoints"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _variant(stage_params: dict, profile_params: Params) -> dict[str, dict]:
    """The keys in which a shipped stage's params differ from its profile's (``ssl.icutmix: true`` for the
    i-CutMix models, ``search.method: poisoncam``...), as ``notebook.setup`` overrides; the data root is
    the data's place on the shipping machine, not a parameter."""
    profile = profile_params.to_dict()
    out: dict[str, dict] = {}
    for section, values in stage_params.items():
        for key, value in values.items():
            if (section, key) != ("data", "root") and profile.get(section, {}).get(key) != value:
                out.setdefault(section, {})[key] = value
    for (section, key), default in ADDED_LATER.items():  # left out of the stage's params at their old value
        values, only = stage_params.get(section), ONE_METHOD.get((section, key))
        if values is None or key in values or (only and values.get("method") != only):
            continue  # not read by the stage, written out, or a key its search method never reads
        if profile.get(section, {}).get(key) != default:
            out.setdefault(section, {})[key] = default
    return out


def _differences(shipped: dict, yours: dict) -> list[str]:
    """Why two key materials differ, in words: each param that differs, the code, or the data."""
    a, b = _flatten(shipped), _flatten(yours)
    out = []
    for name in sorted(set(a) | set(b)):
        if a.get(name) == b.get(name):
            continue
        if name == "params.data.root":
            theirs, ours = (str(x.get(name)).removeprefix("manifest:") for x in (a, b))
            out.append(f"the data files differ from those they were made from (manifest {theirs} shipped, {ours} here)")
        elif name == "code":
            out.append("the code of the helpers modules this stage runs has changed since they were made")
        else:
            out.append(
                f"{name.removeprefix('params.')}: {a.get(name, '(absent)')!r} shipped, {b.get(name, '(absent)')!r} here"
            )
    return out


@dataclass
class Report:
    """What ``install`` did with each shipped stage."""

    installed: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)  # already in the cache
    refused: dict[str, list[str]] = field(default_factory=dict)  # stage/key -> reasons
    refused_seconds: float = 0.0  # what computing the refused stages took when they were made

    def summary(self) -> str:
        n = len(self.installed) + len(self.present) + len(self.refused)
        text = (
            f"shipped checkpoints: {len(self.installed)} of {n} stages installed into the cache, "
            f"{len(self.present)} already there, {len(self.refused)} refused"
        )
        by_reason: dict[tuple[str, ...], list[str]] = {}
        for name, reasons in self.refused.items():
            by_reason.setdefault(tuple(reasons), []).append(name)
        for reasons, names in by_reason.items():
            text += f"\n  refused {', '.join(names)}: " + "; ".join(reasons)
        if self.refused:
            text += (
                f"\n  the refused stages will be computed: about {self.refused_seconds / 60:.0f} min of compute "
                "(one core each) when they were made"
            )
        return text


def read_manifest(profile: str) -> dict | None:
    path = shipped_dir(profile) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); restore it with `git checkout -- {path}`") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), list):
        raise CheckpointError(
            f"{path}: no 'stages' list, not a checkpoint manifest; restore it with `git checkout -- {path}`"
        )
    return manifest


def _key_check(params: Params, entry: dict) -> list[str]:
    """Why the shipped ``entry`` is not the stage your params, code and data ask for (empty: it is)."""
    material = stage_key_material(with_overrides(params, entry["variant"], "shipped variant"), entry["stage"])
    if key_of(material) == entry["key"]:
        return []
    return _differences(entry["key_material"], material) or ["the key differs"]


def install(params: Params) -> Report:
    """Copy every shipped stage that your params, code and data ask for into the cache (see the module's
    docstring). Raises ``CheckpointError`` naming the file if a shipped file's sha256 is not the manifest's."""
    report = Report()
    manifest = read_manifest(params.profile)
    if manifest is None:
        return report
    for entry in manifest["stages"]:
        name = f"{entry['stage']}/{entry['key']}"
        reasons = _key_check(params, entry)
        if reasons:
            report.refused[name] = reasons
            report.refused_seconds += entry["seconds"]
            continue
        final = paths.artifacts_dir() / entry["stage"] / entry["key"]
        source = shipped_dir(params.profile) / entry["stage"] / entry["key"]
        if (final / "params.yaml").is_file():
            damaged = _damaged_copy(source, final, entry)
            if not damaged:
                report.present.append(name)
                continue
            log.warning("%s in the cache is damaged (%s): installed again from the shipped copy", name, damaged)
        problem = _install_stage(source, final, entry, params)
        if problem:
            report.refused[name] = [problem]
            report.refused_seconds += entry["seconds"]
        else:
            report.installed.append(name)
    data_refused = [name for name, reasons in report.refused.items() if any("data files" in r for r in reasons)]
    detail = _data_reason(params) if data_refused else None
    for name in data_refused if detail else []:
        report.refused[name] = [r if "data files" not in r else f"{r}: {detail}" for r in report.refused[name]]
    return report


def _damaged_copy(source: Path, final: Path, entry: dict) -> str | None:
    """Why the cached copy of a shipped stage is not the shipped one (a binary file missing or of another
    size: truncated, overwritten), or None. Sizes only, as this runs at every setup, except for a file shipped
    without some of its arrays (``DROPPED_ARRAYS``): a copy computed here holds them too, and counts as the
    shipped one where every shipped array is equal (a clustering computed on a machine that rounds otherwise
    is not, and the shipped one replaces it: the shipped searches were made on it)."""
    for rel in entry["files"]:
        if Path(rel).suffix in TEXT_SUFFIXES or rel == "stage.json":
            continue
        cached, shipped = final / rel, source / rel
        if not cached.is_file():
            return f"{rel} missing"
        if Path(rel).name in DROPPED_ARRAYS and shipped.is_file():
            if differs := _differing_array(cached, shipped):
                return f"{rel} differs from the shipped file in {differs}"
            continue
        if shipped.is_file() and cached.stat().st_size != shipped.stat().st_size:
            return f"{rel} is {cached.stat().st_size} bytes, the shipped file {shipped.stat().st_size}"
    return None


def _differing_array(cached: Path, shipped: Path) -> str | None:
    """The first array of ``shipped`` (``.npz``) that ``cached`` lacks, cannot read or holds otherwise, or None."""
    try:
        with np.load(cached) as ours, np.load(shipped) as theirs:
            for key in theirs.files:
                if key not in ours.files or not np.array_equal(ours[key], theirs[key]):
                    return key
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        return f"an unreadable file ({type(error).__name__})"
    return None


def unexpected_tensors(path: Path, params: Params) -> str | None:
    """Where a backbone file's tensors are not those of the network ``params.ssl`` builds (names, and shapes
    but the position embedding's, whose length follows the native image size): what differs, or None."""
    from safetensors import safe_open

    from ..models import backbone_for

    network = backbone_for(params.ssl, params.data.image_size or 32)
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    with safe_open(str(path), "pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        return f"{path.name} holds other tensors than {params.ssl.arch} (missing {missing[:3]}, unexpected {extra[:3]})"
    wrong = [k for k in expected if got[k] != expected[k] and "pos_embed" not in k]
    if wrong:
        return f"{path.name}: {wrong[0]} has shape {got[wrong[0]]}, {params.ssl.arch} expects {expected[wrong[0]]}"
    return None


def unreadable(folder: Path, params: Params | None = None) -> str | None:
    """Why a stage folder's tensors or arrays cannot be read back whole (a truncated or damaged file), or None.
    With ``params`` (the stage's own), a backbone must also hold the tensors of the network they build."""
    from safetensors.torch import load_file

    for path in sorted(folder.rglob("*")):
        try:
            if path.suffix == ".safetensors":
                load_file(path)
                if path.name == "backbone.safetensors" and params is not None:
                    wrong = unexpected_tensors(path, params)
                    if wrong:
                        return wrong
            elif path.suffix == ".npz":
                with np.load(path) as z:
                    for key in z.files:
                        z[key]
            elif path.suffix == ".npy":
                np.load(path)
        except Exception as e:  # noqa: BLE001 (any failure to read is the answer)
            return f"{path.name} cannot be read ({type(e).__name__}: {str(e)[:120]})"
    return None


def verify_files(source: Path, entry: dict) -> None:
    """Every file the manifest lists, present and with its sha256; nothing else."""
    name = f"{entry['stage']}/{entry['key']}"
    for rel, expected in entry["files"].items():
        path = source / rel
        if not path.is_file():
            raise CheckpointError(
                f"{path}: missing from the shipped checkpoint {name}; restore it with "
                f"`git checkout -- {path}`, or retrain with `make reproduce RETRAIN=1`"
            )
        got = file_fingerprint(path)
        if got != expected:
            raise CheckpointError(
                f"{path}: sha256 {got[:16]}... is not the manifest's {expected[:16]}...: refused to load the shipped "
                f"checkpoint {name} (the file was changed or damaged). Restore it with `git checkout -- {path}`, "
                "or retrain with `make reproduce RETRAIN=1`"
            )
    extra = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()) if source.is_dir() else []
    unlisted = [rel for rel in extra if rel not in entry["files"]]
    if unlisted:
        raise CheckpointError(f"{source}: files not in the manifest: {', '.join(unlisted[:5])}; refused")


def _install_stage(source: Path, final: Path, entry: dict, params: Params) -> str | None:
    """Copy a shipped stage into the cache; returns why it was not installed (its files do not read back
    whole), or None. A file that is not the manifest's raises ``CheckpointError``."""
    verify_files(source, entry)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for rel in entry["files"]:
            src, dst = source / rel, tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix in TEXT_SUFFIXES:
                text = src.read_text()
                text = text.replace(DATA_TOKEN, str(params.data.root)).replace(
                    ARTIFACTS_TOKEN, str(paths.artifacts_dir())
                )
                dst.write_text(text)
            else:
                shutil.copyfile(src, dst)
        info = json.loads((tmp / "stage.json").read_text())
        info["shipped"] = {
            "commit": entry["commit"],
            "installed_unix": round(time.time(), 1),
            "left_out": entry["left_out"],
            "half_precision": entry["half_precision"],
        }
        (tmp / "stage.json").write_text(json.dumps(info, indent=2) + "\n")
        problem = unreadable(tmp, with_overrides(params, entry["variant"], "shipped variant"))
        if problem:  # shipped damaged, sha256 and all: never served; the stage is computed instead
            shutil.rmtree(tmp)
            return f"the shipped {problem}"
        if (final / "params.yaml").is_file() and not _damaged_copy(source, final, entry):  # a concurrent install won
            shutil.rmtree(tmp)
            return None
        io.replace_dir(tmp, final)  # over an unfinished or damaged folder, if any
        return None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _to_half(src: Path, dst: Path, previous: Path | None = None) -> None:
    """``src`` with its floating tensors in fp16. Where ``previous`` (the copy shipped before) holds the
    same tensors and metadata, its bytes are kept: a re-ship adds nothing to the history."""
    import torch
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        metadata = dict(f.metadata() or {})
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in io.load_weights(src).items()}
    metadata["shipped_as"] = "float16 (loads into the float32 model)"
    if previous is not None and previous.is_file():
        with safe_open(str(previous), "pt") as f:
            same = dict(f.metadata() or {}) == metadata and set(f.keys()) == set(tensors)  # noqa: SIM118
            same = same and all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
        if same:
            shutil.copyfile(previous, dst)
            return
    io.save_weights(dst, tensors, dict(sorted(metadata.items())))


def ship_stage(
    source: Path,
    dest: Path,
    profile_params: Params,
    data_root: str,
    artifacts: str,
    commit: str,
    half: bool = True,
    drop_arrays: dict[str, tuple[str, ...]] | None = None,
    previous: Path | None = None,
) -> dict:
    """Write the cached stage ``source`` as shipped into ``dest`` and return its manifest entry: paths in text
    as tokens, ``LEFT_OUT`` files left out, backbones in fp16 with ``half`` (but the ``EXACT_MODELS``), the
    arrays ``drop_arrays`` names (``{file: (array, ...)}``) removed from their ``.npz``; each file's sha256."""
    import numpy as np

    info = json.loads((source / "stage.json").read_text())
    stage_params = yaml.safe_load((source / "params.yaml").read_text())
    variant = _variant(stage_params, profile_params)
    exact = info["stage"] in EXACT_MODELS and not variant
    drop_arrays = drop_arrays or {}
    before = info.pop("shipped", {})  # a copy installed from an earlier shipping: what that one left out
    files, left_out, halved = {}, list(before.get("left_out", [])), []
    for src in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = str(src.relative_to(source))
        dst = dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel in LEFT_OUT:
            left_out.append(rel)
            continue
        if half and not exact and rel in HALF_PRECISION:
            _to_half(src, dst, previous / rel if previous is not None else None)
            halved.append(rel)
        elif rel in drop_arrays:
            z = np.load(src)
            left_out += [f"{rel}:{k}" for k in z.files if k in drop_arrays[rel]]
            io.save_npz(dst, **{k: z[k] for k in z.files if k not in drop_arrays[rel]})
        elif rel == "stage.json":  # without the install record of an earlier shipping
            text = json.dumps(info, indent=2) + "\n"  # as the cache writes it
            dst.write_text(text.replace(artifacts, ARTIFACTS_TOKEN).replace(data_root, DATA_TOKEN))
        elif src.suffix in TEXT_SUFFIXES:
            dst.write_text(src.read_text().replace(artifacts, ARTIFACTS_TOKEN).replace(data_root, DATA_TOKEN))
        else:
            shutil.copyfile(src, dst)
        files[rel] = file_fingerprint(dst)
    return {
        "stage": info["stage"],
        "key": info["key"],
        "variant": variant,
        "params": stage_params,
        "key_material": info["key_material"],
        "commit": commit,
        "seconds": info["seconds"],
        "left_out": left_out,
        "half_precision": halved or before.get("half_precision") or info.get("half_precision", []),  # or before
        "files": files,
    }


DATA_FILE = "DATA.json.gz"  # the data files the shipped stages were made from: names the ones that differ


def write_data_file(folder: Path, params: Params) -> Path:
    """``DATA_FILE`` in ``folder``: every data file's relative path and the first 12 hex digits of its sha256
    (0.7 MB for CIFAR-10), so that a refusal for other data can name the files that differ."""
    splits = (params.data.train_split, params.data.val_split)
    files = {rel: sha[:12] for rel, sha in data_digests(params.data.root, splits).items()}
    blob = json.dumps({"splits": splits, "files": files}, separators=(",", ":")).encode()
    return io.atomic_write(folder / DATA_FILE, lambda p: p.write_bytes(gzip.compress(blob, 9, mtime=0)))


def _data_reason(params: Params) -> str | None:
    """Which data files differ from the shipped stages' (``DATA_FILE``), in words; None without the file."""
    path = shipped_dir(params.profile) / DATA_FILE
    if not path.is_file():
        return None
    shipped = json.loads(gzip.decompress(path.read_bytes()))
    return "data files " + data_differences(shipped["files"], params.data.root, tuple(shipped["splits"]))


def ship(record_path: Path, out_dir: Path | None = None, half: bool = True) -> dict:
    """Write the shipped checkpoints of the stages a published run used (``record.json``'s ``stages_used``)."""
    record = json.loads(Path(record_path).read_text())
    if "stages_used" not in record:
        raise CheckpointError(f"{record_path}: no 'stages_used' (run `make reproduce` first: the record lists them)")
    if record["commit"].endswith("-dirty"):
        raise CheckpointError(
            f"{record_path}: made at a dirty work tree ({record['commit']}): commit, rerun, then ship"
        )
    profile_params = from_dict(record["params"], f"{record_path} params")
    profile = profile_params.profile
    out_dir = out_dir or shipped_dir(profile)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    data_root, artifacts = str(profile_params.data.root), str(paths.artifacts_dir())
    entries = []
    try:
        for used in record["stages_used"]:
            stage, key = used.split("/")
            if stage not in SHIPPED_STAGES:
                continue
            source = paths.artifacts_dir() / stage / key
            if not (source / "params.yaml").is_file():
                raise CheckpointError(f"{source}: not a complete stage result in the cache")
            entries.append(
                ship_stage(
                    source,
                    tmp / stage / key,
                    profile_params,
                    data_root,
                    artifacts,
                    record["commit"],
                    half,
                    DROPPED_ARRAYS,
                    previous=out_dir / stage / key,
                )
            )
        manifest = {
            "profile": profile,
            "made_by": "python -m helpers.runners.checkpoints ship",
            "record_commit": record["commit"],
            "record_finished_utc": record["finished_utc"],
            "stages": entries,
        }
        io.write_json(tmp / MANIFEST, manifest)
        write_data_file(tmp, profile_params)
        io.replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def verify(params: Params) -> list[str]:
    """Check every shipped file's sha256 and every shipped key against this checkout: lines to print."""
    manifest = read_manifest(params.profile)
    if manifest is None:
        return [f"no shipped checkpoints for profile {params.profile} ({shipped_dir(params.profile)})"]
    lines = []
    for entry in manifest["stages"]:
        name = f"{entry['stage']}/{entry['key']}"
        verify_files(shipped_dir(params.profile) / entry["stage"] / entry["key"], entry)
        reasons = _key_check(params, entry)
        history = {True: "in this history", False: "NOT in this history", None: "history unknown"}
        lines.append(
            f"{name}: files ok; "
            + ("REFUSED: " + "; ".join(reasons) if reasons else "key ok")
            + f"; made at {entry['commit'][:10]} ({history[git_is_ancestor(entry['commit'])]})"
        )
    return lines


def git_is_ancestor(commit: str) -> bool | None:
    """Whether ``commit`` is in this checkout's history (None where git cannot tell)."""
    result = subprocess.run(
        ["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=paths.REPO_ROOT, capture_output=True, text=True
    )
    return {0: True, 1: False}.get(result.returncode)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["ship", "verify", "install"])
    parser.add_argument("--params", default=str(paths.PARAMS_DIR / "cifar10.yaml"))
    parser.add_argument(
        "--record", default=None, help="ship: the published record (default figures/<profile>/record.json)"
    )
    parser.add_argument("--fp32", action="store_true", help="ship: keep backbones in fp32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from ..params import load, with_resolved_root

    params = with_resolved_root(load(args.params))
    if args.action == "ship":
        record = Path(args.record) if args.record else paths.published_dir(params.profile) / "record.json"
        manifest = ship(record, half=not args.fp32)
        size = sum(p.stat().st_size for p in shipped_dir(params.profile).rglob("*") if p.is_file())
        print(f"shipped {len(manifest['stages'])} stages, {size / 2**20:.1f} MiB, in {shipped_dir(params.profile)}")
    elif args.action == "verify":
        print("\n".join(verify(params)))
    else:
        print(install(params).summary())


if __name__ == "__main__":
    main()
