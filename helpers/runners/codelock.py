"""The code lock's command line and the proof behind a renewal.

    python -m helpers.runners.codelock status              the modules whose code moved from helpers/code.lock.json
    python -m helpers.runners.codelock bump <module>       their results change: a new identity (recompute)
    python -m helpers.runners.codelock renew <module> [--against COMMIT]   keep the identity, after the proof below
    python -m helpers.runners.codelock rename <old> <new>   a module renamed: its identity stays (then renew it)

A renewal keeps a module's identity, so every cached and shipped result of the stages that run it stays
valid. That is only true if the new code computes the same results. ``prove_unchanged`` checks it:

1. it runs the smoke profile's pipeline tasks whose stages run the modules, twice: with the committed code
   (a git worktree of ``HEAD``) and with the working tree, each into an artifacts folder of its own;
2. it compares every stage folder the two runs made, file by file: the same files, equal arrays
   (``.npz``), tensors (``.safetensors``), tables and JSON with their timings left out, and equal bytes
   for everything else.

Same machine, same seeds: the pipeline is deterministic, so "unchanged" means bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .. import fingerprint, paths, stages

SMOKE = "params/smoke.yaml"
# The smoke pipeline task that computes each stage (``helpers.runners.pipeline``'s task names; ``helpers.stages``).
STAGE_TASK = {s.name: stages.smoke_task(s.name) for s in stages.STAGES}
TIMING = ("seconds", "per_s", "_unix", "img_s", "minutes")  # names of measured times: never compared


def tasks_for(modules: list[str]) -> list[str]:
    """The smoke tasks that run every stage whose code includes any of ``modules``."""
    return sorted({STAGE_TASK[stage] for stage, code in fingerprint.STAGE_CODE.items() if set(code) & set(modules)})


def _timing(name: str) -> bool:
    return any(part in str(name) for part in TIMING)


def _drop_timing(value):
    if isinstance(value, dict):
        return {k: _drop_timing(v) for k, v in value.items() if not _timing(k)}
    if isinstance(value, list):
        return [_drop_timing(v) for v in value]
    return value


def same_file(a: Path, b: Path, roots: tuple[Path, Path] | None = None) -> bool:
    """Equal content, timings aside (see the module's docstring); in text, each run's artifacts folder
    ``roots`` (file lists name their images there) counts as the same place."""
    if a.suffix == ".npz":
        za, zb = np.load(a), np.load(b)
        return sorted(za.files) == sorted(zb.files) and all(
            np.array_equal(za[k], zb[k], equal_nan=za[k].dtype.kind in "fc") for k in za.files
        )
    if a.suffix == ".safetensors":
        import torch
        from safetensors.torch import load_file

        ta, tb = load_file(str(a)), load_file(str(b))
        return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    if a.suffix not in (".json", ".csv", ".txt", ".yaml"):
        return a.read_bytes() == b.read_bytes()
    ta, tb = a.read_text(), b.read_text()
    if roots:
        ta, tb = ta.replace(str(roots[0]), "@ARTIFACTS@"), tb.replace(str(roots[1]), "@ARTIFACTS@")
    if a.suffix == ".json":
        return _drop_timing(json.loads(ta)) == _drop_timing(json.loads(tb))
    if a.suffix == ".csv":
        import io

        import pandas as pd

        da, db = pd.read_csv(io.StringIO(ta)), pd.read_csv(io.StringIO(tb))
        da, db = (d[[c for c in d.columns if not _timing(c)]] for d in (da, db))
        return da.equals(db)
    return ta == tb


def compare_artifacts(before: Path, after: Path) -> list[str]:
    """What differs between two artifacts folders' finished stage results (empty: nothing)."""

    def stages(root: Path) -> set[str]:
        return {str(p.parent.relative_to(root)) for p in root.glob("*/*/params.yaml")}

    a, b = stages(before), stages(after)
    out = [f"{name}: made only by the committed code" for name in sorted(a - b)]
    out += [f"{name}: made only by your code" for name in sorted(b - a)]
    for name in sorted(a & b):
        fa = {str(p.relative_to(before / name)) for p in (before / name).rglob("*") if p.is_file()}
        fb = {str(p.relative_to(after / name)) for p in (after / name).rglob("*") if p.is_file()}
        if fa != fb:
            out.append(f"{name}: other files ({', '.join(sorted(fa ^ fb)[:5])})")
            continue
        roots = (before.resolve(), after.resolve())
        out += [
            f"{name}/{rel}: differs"
            for rel in sorted(fa)
            if not same_file(before / name / rel, after / name / rel, roots)
        ]
    return out


def _run_pipeline(tree: Path, artifacts: Path, tasks: list[str], data_root: str, log: Path) -> None:
    env = {
        **os.environ,
        "PATCHSEARCH_ARTIFACTS": str(artifacts),
        "PATCHSEARCH_RUNS": str(artifacts.parent / f"{artifacts.name}-runs"),
        "PATCHSEARCH_DATA_ROOT": data_root,
        "TQDM_DISABLE": "1",
    }
    # the runner's module where that tree has it (commits before the runners sub-package: helpers/pipeline.py)
    moved = (tree / "helpers" / "runners" / "pipeline.py").is_file()
    runner = "helpers.runners.pipeline" if moved else "helpers.pipeline"
    cmd = [sys.executable, "-m", runner, "--params", SMOKE, "--only", *tasks]
    with open(log, "w") as out:
        result = subprocess.run(cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"the smoke pipeline failed in {tree} (exit {result.returncode}): see {log}")


def prove_unchanged(modules: list[str], keep: Path | None = None, against: str = "HEAD") -> tuple[list[str], list[str]]:
    """Run the smoke tasks of ``modules`` with the committed code (``against``: ``HEAD``, or an older commit
    whose code held the modules' identities) and with the working tree; return the tasks run and what
    differs (empty: the results are unchanged)."""
    from ..params import load, resolve_data_root

    tasks = tasks_for(modules)
    data_root = str(resolve_data_root(load(paths.REPO_ROOT / SMOKE)))
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="codelock-"))
    work.mkdir(parents=True, exist_ok=True)
    committed = work / "committed"
    subprocess.run(["git", "worktree", "add", "--detach", "--force", str(committed), against], cwd=paths.REPO_ROOT,
                   check=True, capture_output=True)  # fmt: skip
    try:
        _run_pipeline(committed, work / "before", tasks, data_root, work / "before.log")
        _run_pipeline(paths.REPO_ROOT, work / "after", tasks, data_root, work / "after.log")
        return tasks, compare_artifacts(work / "before", work / "after")
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(committed)], cwd=paths.REPO_ROOT, capture_output=True
        )
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(description="The code lock: which modules moved, and recording them.")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("status", help="the modules whose code moved from the lock")
    bump = sub.add_parser("bump", help="new identities: the results of these modules change (recompute)")
    bump.add_argument("modules", nargs="+")
    renew = sub.add_parser("renew", help="keep the identities, after proving the smoke results unchanged")
    renew.add_argument("modules", nargs="+")
    renew.add_argument("--keep", default=None, help="keep both runs' artifacts in this folder")
    renew.add_argument("--against", default="HEAD", help="the commit whose results yours must equal (default HEAD)")
    rename = sub.add_parser("rename", help="a module renamed: move its lock entry, keys unchanged (then renew it)")
    rename.add_argument("old")
    rename.add_argument("new")
    args = parser.parse_args(argv)
    if args.action == "status":
        moved = fingerprint.moved_modules()
        print("\n".join(f"{name}: {why}" for name, why in moved.items()) or "every module matches the lock")
        raise SystemExit(1 if moved else 0)
    if args.action == "rename":
        fingerprint.rename_in_lock(args.old, args.new)
        print(f"{args.old} is {args.new} in the lock, under its old name in keys: renew {args.new} to prove its code")
        return
    if args.action == "bump":
        fingerprint.write_lock(args.modules, new_identity=True)
        print(f"bumped {', '.join(args.modules)}: every stage that runs them will be computed again")
        return
    tasks, differences = prove_unchanged(args.modules, args.keep, args.against)
    if differences:
        print("NOT renewed: the smoke results differ (bump instead if that is intended):")
        print("\n".join(f"  {line}" for line in differences[:20]))
        raise SystemExit(1)
    head = subprocess.run(["git", "rev-parse", "--short", args.against], capture_output=True, text=True).stdout.strip()
    proof = f"smoke tasks {' '.join(tasks)} equal to {head}'s, {time.strftime('%Y-%m-%d')}"
    fingerprint.write_lock(args.modules, new_identity=False, proof=proof)
    print(f"renewed {', '.join(args.modules)}: {proof}")


if __name__ == "__main__":
    main()
