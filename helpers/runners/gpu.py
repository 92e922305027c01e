"""The GPU queue: the paper-strength profile (``params/cifar10-gpu.yaml``) computed one job at a time on a lent
GPU, shipped into ``figures/cifar10-gpu/checkpoints/`` so that every CPU reader runs the defenses on it.

A lent GPU comes by chance, for 15 minutes in all, one command of at most 10 minutes, a working tree of at most
64 MiB travelling there and at most 8 files of 16 MiB coming back. So each job is one prepared command:

    python -m helpers.runners.gpu prepare              # here: the next job, and what it needs, into .gpu/
    # on the GPU (the device tool, carrying .gpu):  python3 -m helpers.runners.gpu run --out "$OUT"
    python -m helpers.runners.gpu install <files back> # here: parts joined, every sha256 checked, stages shipped

``prepare`` picks the first job of ``JOBS`` not yet done (the shipped ``MANIFEST.json`` records each job),
packs CIFAR-10 (its 60,000 JPEG files share a 623-byte header: zlib takes 55 MB to 20 MB, and the files come
back byte for byte, so the data manifest and every cache key are the same there), packs in the earlier
jobs' results the job reads (``Job.needs``), and takes the shipped checkpoints out of git's index for the
call (they would not fit in 64 MiB; ``install`` or ``restore`` puts them back). ``run`` unpacks, installs
the carried results into the cache; the first job times a warm-up of as many SSL trainings at once as it
trains and sets the epochs from it (as many as fit, at most the profile's); a later job that trains scales
the first job's training time to its own and refuses to start a training that would not end in time. It
runs the job's pipeline tasks (``helpers.runners.pipeline``: the same code as on a CPU), rounds new
backbones to fp16 in place, so that every later stage, there and here, reads the weights that are shipped,
and writes everything it computed, with the params, cache key, commit and sha256 of each file, as one
archive split into parts. A job stopped at its deadline also brings back what its unfinished searches and
classifiers had done (``PARTIAL_STAGES``), kept in ``checkpoints/partial/`` until its next try resumes there.
``install`` checks the parts, the archive and every file, then adds the stages to the shipped manifest, and
writes the epochs the warm-up chose into the params file. The whole queue runs on a CPU in
``tests/test_gpu_queue.py`` on a tiny version of the profile, through the same functions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from .. import io, paths
from ..cache import stages_used
from ..fingerprint import file_fingerprint
from .checkpoints import DROPPED_ARRAYS, SHIPPED_STAGES, ship_stage

PARAMS = paths.PARAMS_DIR / "cifar10-gpu.yaml"
STAGING = paths.REPO_ROOT / ".gpu"
PART_BYTES = 15 * 2**20  # the device returns files of at most 16 MiB
MAX_PARTS = 7  # and at most 8 files: the parts and job.json
BUDGET_S = 580  # one command may run 600 s (the machine's start and the copies are not counted in it)
PACK_RESERVE_S = 20  # kept for writing the results after the last task (J1: unpacking, installing, packing 4 s)
# Stages that keep what they finished in ``<key>.partial/`` beside the stage (``search.SweepCheckpoint``: each
# window side; ``classify.classifier_stage``: each member), a few MiB: a job stopped at its deadline brings
# them back and its next try resumes there. (A training's checkpoints would not come back: a job that trains
# refuses to start a training that would not end in time.)
PARTIAL_STAGES = ("search_", "classifier_")
PARTIAL = "partial"  # figures/<profile>/checkpoints/partial/<stage>/<key>/, until the stage is shipped


@dataclass(frozen=True)
class Job:
    name: str
    about: str
    phases: tuple[tuple[str, ...], ...]  # pipeline tasks (``helpers.runners.pipeline``), phase after phase
    needs: tuple[str, ...] = ()  # earlier results it reads: "[<variant>:]<stage>[@<search method>]"
    trains: int = 0  # SSL models trained side by side (the warm-up times as many at once)
    sets_epochs: bool = False  # its warm-up chooses ssl.epochs for every later job
    reserve_s: int = 90  # time kept after the training phase for the phases after it


JOBS = (
    Job(
        "J1",
        "the backdoored and the clean model side by side, then their linear probes",
        (("ssl_poisoned", "ssl_clean"), ("eval_poisoned", "eval_clean")),
        trains=2,
        sets_epochs=True,
    ),
    Job(  # added after J1 planted no backdoor (10% labels: 9.9% against 4.5%), before any run of it: issue 21's
        # stronger attack, at J1's epochs beside J1's clean model (whose key does not read the attack)
        "J2",
        "the stronger attack (every target image, a 10 px trigger): its backdoored model, its probes and the clean "
        "model's with its trigger",
        (("strong:ssl_poisoned",), ("strong:eval_poisoned", "strong:eval_clean")),
        needs=("ssl_clean",),
        trains=1,
    ),
    Job(
        "J3",
        "both defenses on the backdoored model: PatchSearch, PoisonCAM with the profile's score (flips into the "
        "candidate's cluster that a flat square does not cause) and with its paper's; the GPU benchmark",
        (
            (
                "defense_patchsearch_poisoned",
                "defense_poisoncam_poisoned",
                "poisoncam_paper:defense_poisoncam_poisoned",
            ),
            ("bench",),
        ),
        needs=("ssl_poisoned",),
    ),  # fmt: skip
    Job(
        "J4",
        "the models retrained on PatchSearch's and PoisonCAM's filtered lists, then their probes",
        (
            ("ssl_filtered_patchsearch", "ssl_filtered_poisoncam"),
            ("eval_filtered_patchsearch", "eval_filtered_poisoncam"),
        ),
        needs=tuple(
            f"{s}@{m}" for m in ("patchsearch", "poisoncam") for s in ("search_poisoned", "classifier_poisoned")
        ),
        trains=2,
    ),  # fmt: skip
    Job(
        "J5",
        "two more (target, trigger seed) pairs: their backdoored models, their probes and the clean model's",
        (
            ("pair2:ssl_poisoned", "pair3:ssl_poisoned"),
            ("pair2:eval_poisoned", "pair3:eval_poisoned", "pair2:eval_clean", "pair3:eval_clean"),
        ),
        needs=("ssl_clean",),
        trains=2,
    ),  # fmt: skip
    *(
        Job(  # one pair a job: two backbones (2 x 21 MiB in fp16) and the data (19 MiB) would not travel in 64 MiB
            name,
            f"both defenses on the {ordinal} pair's backdoored model",
            (tuple(f"{pair}:defense_{m}_poisoned" for m in ("patchsearch", "poisoncam")),),
            needs=(f"{pair}:ssl_poisoned",),
        )
        for name, ordinal, pair in (("J6", "second", "pair2"), ("J7", "third", "pair3"))
    ),
    Job(
        "J8",
        "the model retrained on PoisonCAM's filtered list under its paper's score, and the backdoored model "
        "with i-CutMix, then their probes",
        (
            ("poisoncam_paper:ssl_filtered_poisoncam", "ssl_poisoned_icutmix"),
            ("poisoncam_paper:eval_filtered_poisoncam", "eval_poisoned_icutmix"),
        ),
        needs=tuple(f"poisoncam_paper:{s}@poisoncam" for s in ("search_poisoned", "classifier_poisoned")),
        trains=2,
    ),  # fmt: skip
)
JOB_BY_NAME = {job.name: job for job in JOBS}


class QueueError(RuntimeError):
    """A queue step that cannot go on; the message says what to do."""


# ---------------------------------------------------------------------------------------------------- data
PACK_NAME = "cifar10.pack"
CARRIED_ARCHIVE = "stages.tar.gz"  # the shipped stages a job reads, gzipped (a search's scores are mostly zeros)


def pack_data(root: Path, dest: Path) -> dict:
    """Every file of ``root/train`` and ``root/test`` in one zlib stream with an index of relative paths and
    sizes, and the data manifest they hash to (``fingerprint.data_manifest``)."""
    from ..fingerprint import data_manifest

    root = Path(root)
    files = sorted(p for split in ("train", "test") for p in (root / split).rglob("*") if p.is_file())
    index, blob = [], zlib.compressobj(level=6)
    chunks = []
    for path in files:
        content = path.read_bytes()
        index.append([str(path.relative_to(root)), len(content)])
        chunks.append(blob.compress(content))
    chunks.append(blob.flush())
    header = json.dumps({"index": index, "manifest": data_manifest(root, ("train", "test"))}).encode()
    body = b"".join(chunks)

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header + body)

    io.atomic_write(dest, write)
    return {"files": len(index), "bytes": sum(size for _, size in index), "packed_bytes": dest.stat().st_size}


def unpack_data(pack: Path, dest: Path) -> Path:
    """The files of ``pack_data`` under ``dest``; refused unless they hash to the manifest packed with them."""
    from ..fingerprint import data_manifest

    raw = Path(pack).read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    body = zlib.decompress(raw[8 + size :])
    offset = 0
    for rel, length in header["index"]:
        path = Path(dest) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body[offset : offset + length])
        offset += length
    if offset != len(body):
        raise QueueError(f"{pack}: {len(body) - offset} bytes beyond its index: the pack is damaged")
    got = data_manifest(dest, ("train", "test"))
    if got != header["manifest"]:
        raise QueueError(f"{pack}: unpacked files hash to {got}, packed as {header['manifest']}: the pack is damaged")
    return Path(dest)


# --------------------------------------------------------------------------------------- parts of an archive
def split_file(path: Path, out_dir: Path, part_bytes: int = PART_BYTES) -> list[dict]:
    """``path`` cut into ``<name>.000, .001, ...`` of at most ``part_bytes`` in ``out_dir``, each with its sha256."""
    parts, n = [], 0
    with open(path, "rb") as f:
        while block := f.read(part_bytes):
            part = Path(out_dir) / f"{Path(path).name}.{n:03d}"
            part.write_bytes(block)
            parts.append({"name": part.name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
            n += 1
    return parts


def join_parts(folder: Path, parts: list[dict], dest: Path, sha256: str) -> Path:
    """The parts of ``split_file`` joined into ``dest``; each part and the whole checked against their sha256,
    and a missing or damaged part named."""
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        for part in parts:
            path = Path(folder) / part["name"]
            if not path.is_file():
                raise QueueError(f"{path}: part missing (job.json lists {len(parts)} parts)")
            block = path.read_bytes()
            if hashlib.sha256(block).hexdigest() != part["sha256"]:
                raise QueueError(f"{path}: sha256 differs from job.json's: the part is damaged; fetch it again")
            digest.update(block)
            out.write(block)
    if digest.hexdigest() != sha256:
        raise QueueError(f"{dest}: the joined archive's sha256 differs from job.json's")
    return Path(dest)


# ------------------------------------------------------------------------------------------------ the queue
def shipped_dir(profile: str) -> Path:
    return paths.published_dir(profile) / "checkpoints"


def read_manifest(profile: str) -> dict:
    path = shipped_dir(profile) / "MANIFEST.json"
    if not path.is_file():
        return {"profile": profile, "made_by": "python -m helpers.runners.gpu install", "stages": [], "jobs": {}}
    return json.loads(path.read_text())


def next_job(manifest: dict) -> Job | None:
    """The first job whose record is missing or says it did not finish."""
    for job in JOBS:
        record = manifest.get("jobs", {}).get(job.name)
        if not record or not record.get("complete"):
            return job
    return None


def training_reference(manifest: dict) -> dict | None:
    """How long the job that set the epochs took to train, from its record: what a later job's trainings
    (as many side by side, as many epochs) take on a GPU of its kind, prepare task included. The first try of
    J1 showed that a warm-up can miss the trained rate 8-fold; a finished training cannot."""
    for job in JOBS:
        record = manifest.get("jobs", {}).get(job.name, {})
        if job.sets_epochs and record.get("complete"):
            return {
                "job": job.name,
                "seconds": record["phases"][0]["seconds"],
                "trains": job.trains,
                "images": record["warmup"]["training_images"],
                "epochs": record["epochs"]["chosen"],
                "gpu": record["device"]["gpu"],
            }
    return None


def job_state(record: dict | None) -> str:
    """A job's state from its record in the shipped manifest."""
    if not record:
        return "not run"
    if record.get("complete"):
        return "done"
    kept = record.get("partial", [])
    return "ran out of time" + (f" ({len(kept)} unfinished stages kept for its next try)" if kept else "")


def need_params(params, need: str):
    """``(params, stage)`` of a ``Job.needs`` entry: ``[<variant>:]<stage>[@<search method>]``."""
    from ..params import with_variant
    from ..search import with_method

    variant, _, rest = need.rpartition(":")
    stage, _, method = rest.partition("@")
    if variant:
        params = with_variant(params, variant)
    if method:
        params = with_method(params, method)
    return params, stage


def prepare(params_path: Path = PARAMS, staging: Path = STAGING, job_name: str | None = None) -> dict:
    """Fill ``staging`` with what the next job (or ``job_name``) needs on the GPU: the job, the data pack and
    the shipped results it reads (see the module's docstring). Returns the job's description."""
    from ..params import load, stage_hash, with_resolved_root

    params = with_resolved_root(load(params_path))
    manifest = read_manifest(params.profile)
    job = JOB_BY_NAME[job_name] if job_name else next_job(manifest)
    if job is None:
        raise QueueError(f"every job of the queue is done ({', '.join(j.name for j in JOBS)})")
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "stages").mkdir(parents=True)
    by_key = {(e["stage"], e["key"]): e for e in manifest["stages"]}
    carried = []
    wanted = [(stage, stage_hash(p, stage)) for p, stage in (need_params(params, need) for need in job.needs)]
    earlier = manifest.get("jobs", {}).get(job.name, {}).get("stages", [])  # a job that ran out of time: its part
    wanted += [tuple(stage_key.split("/")) for stage_key in earlier]
    for stage, key in dict.fromkeys(wanted):
        entry = by_key.get((stage, key))
        if entry is None:
            raise QueueError(
                f"job {job.name} needs {stage}/{key}, which is not shipped in {shipped_dir(params.profile)}: "
                "run the jobs before it first (python -m helpers.runners.gpu status)"
            )
        shutil.copytree(shipped_dir(params.profile) / stage / key, staging / "stages" / stage / key)
        carried.append(entry)
    partial = carry_partial(params.profile, manifest.get("jobs", {}).get(job.name, {}), staging)
    info = pack_data(Path(params.data.root), staging / PACK_NAME)
    description = {
        "job": job.name,
        "about": job.about,
        "params": paths.repo_relative(Path(params_path).resolve()),  # repository-relative: the same path on the GPU
        "commit": _git("rev-parse", "HEAD"),
        "prepared_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": info,
        "carried": [f"{e['stage']}/{e['key']}" for e in carried],
        "carried_partial": partial,
    }
    reference = training_reference(manifest)
    if job.trains and not job.sets_epochs and reference:
        description["training_reference"] = reference
    io.write_json(staging / "stages" / "entries.json", carried)
    with tarfile.open(staging / CARRIED_ARCHIVE, "w:gz", compresslevel=6) as tar:  # searches: mostly zeros
        tar.add(staging / "stages", arcname="stages")
    shutil.rmtree(staging / "stages")
    io.write_json(staging / "job.json", description)
    return description


def _git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=paths.REPO_ROOT, capture_output=True, text=True)
    return result.stdout.strip()


# ------------------------------------------------------------------------------------------------ on the GPU
def warmup_rate(params_path: Path, steps: int | None = None, threads: int | None = None) -> float:
    """Images per second of one SSL training of the profile on this machine (``bench.ssl_rate``: the real
    training loop on random pixels), in the steady state: on a GPU the first 10 steps are left out, on a CPU
    the first. ``threads``: the CPU threads the training gets (as many as the job's phase gives it).

    The first try of J1 (2026-11-30) timed 446 img/s each here, with every step counted after the first and
    torch's default threads in both processes (32 threads on 16 cores), and chose 3 epochs; its training
    then ran at 3,496-3,635 img/s each."""
    import torch

    from ..params import load, with_resolved_root
    from ..studies.bench import ssl_rate

    if threads:
        torch.set_num_threads(threads)
    params = with_resolved_root(load(params_path))
    gpu = torch.cuda.is_available()
    steps = steps or (40 if gpu else 2)
    p = params.ssl
    return ssl_rate(p, params.compute.ssl_precision, params.compute.compile, p.batch_size, steps, 10 if gpu else None)


def measure_side_by_side(params_path: Path, n: int, steps: int | None = None) -> list[float]:
    """``warmup_rate`` in ``n`` processes at once: what each of ``n`` trainings side by side gets, each with the
    threads ``_run_phase`` gives it."""
    threads = max(1, (os.cpu_count() or 2) // n)
    cmd = [sys.executable, "-m", "helpers.runners.gpu", "warmup", "--params", str(params_path)]
    cmd += ["--threads", str(threads)] + (["--steps", str(steps)] if steps else [])
    procs = [subprocess.Popen(cmd, cwd=paths.REPO_ROOT, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    rates = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise QueueError(f"the warm-up failed (exit {proc.returncode})")
        rates.append(json.loads(out.strip().splitlines()[-1])["images_per_s"])
    return rates


def choose_epochs(rate: float, n_images: int, seconds: float, aim: int) -> int:
    """The most epochs of ``n_images`` at ``rate`` images per second that fit in ``seconds``, at most ``aim``."""
    return min(aim, int(seconds * rate // n_images))


def _with_epochs(path: Path, epochs: int, note: str) -> str:
    """The params file's text with ``ssl.epochs`` set (its comment replaced by ``note``)."""
    text = Path(path).read_text()
    match = re.search(r"(?m)^ssl:\n(?:[ \t].*\n|\n)*?(  epochs: *)(\d+)([^\n]*)", text)
    if not match:
        raise QueueError(f"{path}: no 'epochs:' line in its ssl section")
    start, end = match.start(2), match.end(3)
    return text[:start] + f"{epochs}  # {note}" + text[end:]


def _run_phase(params_path: Path, tasks: tuple[str, ...], workers: int, env: dict, deadline: float, log: Path) -> bool:
    """Run ``tasks`` with ``helpers.runners.pipeline``; stop them all at ``deadline``. True when every one finished."""
    threads = max(1, (os.cpu_count() or 2) // workers)
    cmd = [sys.executable, "-m", "helpers.runners.pipeline", "--params", str(params_path), "--only", *tasks]
    cmd += ["--workers", str(workers), "--threads", str(threads)]
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=paths.REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            return proc.wait(timeout=max(1.0, deadline - time.time())) == 0
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(3)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.write("stopped at the job's deadline\n")
            return False


def _round_to_fp16(folder: Path) -> bool:
    """Store the stage's backbone in fp16, in place: later stages, here and on every CPU, read these weights."""
    from .checkpoints import _to_half

    weights = folder / "backbone.safetensors"
    if not weights.is_file():
        return False
    tmp = weights.with_name(".half.safetensors")
    _to_half(weights, tmp)
    os.replace(tmp, weights)
    info = json.loads((folder / "stage.json").read_text())
    info["half_precision"] = ["backbone.safetensors"]
    io.write_json(folder / "stage.json", info)
    return True


def device_description() -> dict:
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(), "gpu": gpu}


def run(
    out: Path, staging: Path = STAGING, budget_s: float = BUDGET_S, work: Path | None = None, rate: float | None = None
) -> dict:
    """Run the prepared job on this machine and write its results to ``out`` (see the module's docstring).
    ``rate``: the images per second each training gets, as measured by an earlier run's training on this GPU
    (its ``history.json``), instead of the warm-up's."""
    saved = dict(os.environ)
    try:
        return _run(Path(out), staging, budget_s, work, rate)
    finally:  # the job's data root, artifacts and figures folders are its own
        os.environ.clear()
        os.environ.update(saved)


def _run(out: Path, staging: Path, budget_s: float, work: Path | None, given_rate: float | None = None) -> dict:
    from ..data import select_split
    from ..params import load, with_resolved_root
    from .checkpoints import _install_stage

    start = time.time()
    deadline = start + budget_s
    description = json.loads((staging / "job.json").read_text())
    job = JOB_BY_NAME[description["job"]]
    work = Path(work or "/tmp/patchsearch-gpu")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_root = unpack_data(staging / PACK_NAME, work / "cifar10")
    artifacts = work / "artifacts"
    env = {
        **os.environ,
        "PATCHSEARCH_DATA_ROOT": str(data_root),
        "PATCHSEARCH_ARTIFACTS": str(artifacts),
        "PATCHSEARCH_FIGURES": str(work / "no-figures"),  # nothing shipped is found but what was carried
        "PATCHSEARCH_RUNS": str(work / "runs"),
        "PATCHSEARCH_STAGE_LOG": str(work / "stages.log"),
        "PYTHONUNBUFFERED": "1",
    }
    os.environ.update({k: env[k] for k in ("PATCHSEARCH_DATA_ROOT", "PATCHSEARCH_ARTIFACTS", "PATCHSEARCH_FIGURES")})
    params_path = paths.REPO_ROOT / description["params"]
    params = with_resolved_root(load(params_path))
    with tarfile.open(staging / CARRIED_ARCHIVE) as tar:
        tar.extractall(work / "carried", filter="data")
    carried = work / "carried" / "stages"
    for entry in json.loads((carried / "entries.json").read_text()):
        final = artifacts / entry["stage"] / entry["key"]
        if not (final / "params.yaml").is_file():
            problem = _install_stage(carried / entry["stage"] / entry["key"], final, entry, params)
            if problem:
                raise QueueError(f"carried stage {entry['stage']}/{entry['key']}: {problem}")
    for folder in sorted((staging / PARTIAL).glob("*/*")):  # where an earlier try of the job stopped
        shutil.copytree(folder, artifacts / folder.parent.name / f"{folder.name}.partial", dirs_exist_ok=True)
    record = {**description, "device": device_description(), "budget_s": budget_s, "phases": []}
    log = work / "job.log"
    run_params_path = work / "params.yaml"
    shutil.copyfile(params_path, run_params_path)
    if job.trains:
        n_images = len(select_split(params, "train"))
        reference = description.get("training_reference")
        if given_rate:
            rate, source = given_rate, "an earlier training on this GPU"
            record["warmup"] = {"processes": job.trains, "given_images_per_s_each": rate, "training_images": n_images}
        elif reference and not job.sets_epochs:  # no warm-up: the first job's training time, scaled to this one's
            ref_s = reference["seconds"] * n_images / reference["images"] * job.trains / reference["trains"]
            ref_s *= params.ssl.epochs / reference["epochs"]
            rate, source = params.ssl.epochs * n_images / ref_s, f"job {reference['job']}"
            record["warmup"] = {"reference": reference, "training_images": n_images}
        else:
            rates = measure_side_by_side(params_path, job.trains)
            rate, source = min(rates), "warm-up"
            record["warmup"] = {"processes": job.trains, "images_per_s_each": rates, "training_images": n_images}
        train_s = deadline - time.time() - job.reserve_s - PACK_RESERVE_S
        if job.sets_epochs:
            epochs = choose_epochs(rate, n_images, train_s, params.ssl.epochs)
            if epochs < 1:
                raise QueueError(f"one epoch of {n_images} images at {rate:.0f} img/s does not fit in {train_s:.0f} s")
            note = (
                f"set by GPU job {job.name} ({source}): {job.trains} trainings side by side at {rate:,.0f} img/s each "
                f"on {record['device']['gpu'] or 'a CPU'}, {train_s:.0f} s of its budget (helpers.runners.gpu)"
            )
            run_params_path.write_text(_with_epochs(params_path, epochs, note))
            record["epochs"] = {"chosen": epochs, "aim": params.ssl.epochs, "note": note}
        else:
            need_s = params.ssl.epochs * n_images / rate
            if need_s > train_s:
                raise QueueError(
                    f"{params.ssl.epochs} epochs of {n_images} images at {rate:.0f} img/s take {need_s:.0f} s; job "
                    f"{job.name} has {train_s:.0f} s: not started (a slower GPU than the first job's?)"
                )
    run_params = with_resolved_root(load(run_params_path))
    complete = True
    for phase in job.phases:
        phase_start = time.time()
        if phase == ("bench",):
            finished = _bench(run_params, work / "bench.md")
        else:
            workers = len(phase) if job.trains else min(len(phase), 3)
            finished = _run_phase(run_params_path, phase, workers, env, deadline - PACK_RESERVE_S, log)
        if job.trains and phase is job.phases[0]:  # the trained backbones, in fp16 before anything reads them
            for stage_key in stages_used(work / "stages.log", computed_only=True):
                if stage_key.startswith("ssl_"):
                    _round_to_fp16(artifacts / stage_key)
        record["phases"].append(
            {"tasks": list(phase), "finished": finished, "seconds": round(time.time() - phase_start)}
        )
        complete &= finished
        if not finished:
            break
    record["complete"] = complete
    record["seconds"] = round(time.time() - start)
    _write_results(out, work, artifacts, run_params, str(data_root), job, description["commit"], record)
    return record


def _write_results(out: Path, work: Path, artifacts: Path, run_params, data_root, job, commit, record) -> None:
    """The new stages (complete ones only), their entries, the logs and the record: one archive in parts."""
    bundle = work / "bundle"
    entries = []
    for stage_key in stages_used(work / "stages.log", computed_only=True):
        source = artifacts / stage_key
        if stage_key.split("/")[0] in SHIPPED_STAGES and (source / "params.yaml").is_file():
            dest = bundle / "stages" / stage_key
            entry = ship_stage(source, dest, run_params, data_root, str(artifacts), commit, False, DROPPED_ARRAYS)
            entries.append({**entry, "job": job.name})  # backbones: made fp16 on the GPU (_round_to_fp16)
    record["stages"] = [f"{e['stage']}/{e['key']}" for e in entries]
    record["partial"] = pack_partial(artifacts, bundle / PARTIAL)
    io.write_json(bundle / "entries.json", entries)
    (bundle / "logs").mkdir(parents=True, exist_ok=True)
    for log in [work / "job.log", work / "bench.md", *sorted((work / "runs").rglob("*.log"))]:
        if log.is_file():
            shutil.copyfile(log, bundle / "logs" / log.name)
    archive = work / "results.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
        tar.add(bundle, arcname="results")
    parts = split_file(archive, out)
    if len(parts) > MAX_PARTS:
        raise QueueError(f"{len(parts)} parts of {PART_BYTES >> 20} MiB: more than the {MAX_PARTS} that come back")
    record["archive"] = {"name": archive.name, "sha256": file_fingerprint(archive), "parts": parts}
    io.write_json(out / "job.json", record)


# ------------------------------------------------------------------------------- where a stopped job stopped
def pack_partial(artifacts: Path, dest: Path) -> list[str]:
    """Copy into ``dest/<stage>/<key>/`` the ``<key>.partial/`` folder of every stage of ``PARTIAL_STAGES``
    that did not finish; returns their ``<stage>/<key>``."""
    packed = []
    for folder in sorted(Path(artifacts).glob("*/*.partial")):
        stage, key = folder.parent.name, folder.name.removesuffix(".partial")
        if stage.startswith(PARTIAL_STAGES) and not (folder.parent / key / "params.yaml").is_file():
            shutil.copytree(folder, Path(dest) / stage / key)
            packed.append(f"{stage}/{key}")
    return packed


def keep_partial(source: Path, target: Path, entries: list[dict]) -> None:
    """Install the parts a job brought back (``pack_partial``) into ``target``, replacing older ones, and drop
    the part of every stage now shipped (``entries``)."""
    for folder in sorted(Path(source).glob("*/*")):
        final = target / folder.parent.name / folder.name
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(folder, final)
    for entry in entries:
        shutil.rmtree(target / entry["stage"] / entry["key"], ignore_errors=True)
    for folder in sorted(target.glob("*"), reverse=True) + [target]:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def carry_partial(profile: str, record: dict, staging: Path) -> list[str]:
    """Copy the parts the job's last try brought back (its record's ``partial``) into ``staging``."""
    carried = []
    for stage_key in record.get("partial", []):
        source = shipped_dir(profile) / PARTIAL / stage_key
        if source.is_dir():
            shutil.copytree(source, staging / PARTIAL / stage_key)
            carried.append(stage_key)
    return carried


def _bench(params, dest: Path) -> bool:
    """The GPU benchmark of the profile's network (``helpers.studies.bench.profile_bench``), as Markdown."""
    from ..studies.bench import profile_bench

    try:
        dest.write_text(profile_bench(params))
        return True
    except Exception as e:  # a benchmark never loses the job's results
        dest.write_text(f"benchmark failed: {type(e).__name__}: {e}\n")
        return False


# ------------------------------------------------------------------------------------------------ back here
def install(folder: Path, params_path: Path = PARAMS, work: Path | None = None) -> dict:
    """Check and ship the files a job brought back (``folder``: ``job.json`` and the archive's parts) into
    ``figures/<profile>/checkpoints/``; write the epochs a warm-up chose into the params file."""
    import tempfile

    from ..params import load
    from .checkpoints import verify_files

    folder = Path(folder)
    record = json.loads((folder / "job.json").read_text())
    profile = load(params_path).profile
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        archive = join_parts(folder, record["archive"]["parts"], tmp / "results.tar.gz", record["archive"]["sha256"])
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        results = tmp / "results"
        entries = json.loads((results / "entries.json").read_text())
        target = shipped_dir(profile)
        for entry in entries:
            source = results / "stages" / entry["stage"] / entry["key"]
            verify_files(source, entry)  # every file present, with the sha256 written on the GPU
            final = target / entry["stage"] / entry["key"]
            final.parent.mkdir(parents=True, exist_ok=True)
            staged = final.with_name(f".{final.name}.new")
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(source, staged)
            io.replace_dir(staged, final)
        keep_partial(results / PARTIAL, target / PARTIAL, entries)
        logs = target / "logs" / record["job"]
        if (results / "logs").is_dir():
            shutil.rmtree(logs, ignore_errors=True)
            shutil.copytree(results / "logs", logs)
    manifest = read_manifest(profile)
    new = {(e["stage"], e["key"]) for e in entries}
    manifest["stages"] = [e for e in manifest["stages"] if (e["stage"], e["key"]) not in new] + entries
    manifest.setdefault("jobs", {})[record["job"]] = {k: v for k, v in record.items() if k != "archive"}
    manifest["record_commit"] = record["commit"]
    manifest["record_finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    io.write_json(target / "MANIFEST.json", manifest)
    if "epochs" in record:
        io.write_text(params_path, _with_epochs(params_path, record["epochs"]["chosen"], record["epochs"]["note"]))
    io.write_text(target.parent / REPORT_NAME, queue_report(params_path))
    return record


REPORT_NAME = "QUEUE.md"  # beside the checkpoints: figures/<profile>/QUEUE.md


def shipped_evaluations(profile: str, variant: dict | None = None) -> dict[str, Path]:
    """The shipped evaluations of the profile's own models (``variant`` None) or of one variant's (its overrides,
    as the manifest records them): ``{"eval_poisoned": folder, ...}``."""
    return {
        e["stage"]: shipped_dir(profile) / e["stage"] / e["key"]
        for e in read_manifest(profile)["stages"]
        if e["stage"].startswith("eval_") and (e.get("variant") or {}) == (variant or {}) and not e.get("method")
    }


def backdoor_verdict(profile: str, fraction: float) -> dict | None:
    """The backdoored model's probe ASR beside the clean model's at ``fraction`` of the labels (shares, mean
    over probe seeds), and whether the project's rule calls the backdoor planted; None before both exist."""
    import pandas as pd

    evals = shipped_evaluations(profile)
    if not {"eval_poisoned", "eval_clean"} <= set(evals):
        return None
    return _verdict({k: pd.read_csv(evals[k] / "probe.csv") for k in ("eval_poisoned", "eval_clean")}, fraction)


def _verdict(probes: dict, fraction: float) -> dict:
    """``backdoor_verdict`` from the two probe tables (``{"eval_poisoned": ..., "eval_clean": ...}``)."""
    from ..evaluate import backdoor_planted, mean_row

    asr, clean_asr = (mean_row(probes[k], fraction)["ASR (%)"] / 100 for k in ("eval_poisoned", "eval_clean"))
    return {"asr": asr, "clean_asr": clean_asr, "planted": backdoor_planted(asr, clean_asr), "fraction": fraction}


def queue_report(params_path: Path = PARAMS) -> str:
    """``figures/<profile>/QUEUE.md``: every job of the queue (run or not, where, how long), the epochs and
    the training rate the first job measured, and what the shipped evaluations show so far: the paper's
    Table 2 rows of the backdoored model beside the clean one, and the planted rule's verdict."""
    import pandas as pd

    from ..evaluate import planted_rule, table2_row
    from ..params import load
    from ..plotting import markdown_table

    params = load(params_path)
    manifest = read_manifest(params.profile)
    jobs = manifest.get("jobs", {})
    lines = [
        f"# The GPU queue of `{paths.repo_relative(Path(params_path).resolve())}`",
        "",
        "Written by `python -m helpers.runners.gpu install` from `checkpoints/MANIFEST.json` and the shipped "
        "evaluations: do not edit.",
        "",
        "| job | state | GPU | minutes on it | what it computes |",
        "|---|---|---|---|---|",
    ]
    for job in JOBS:
        record = jobs.get(job.name)
        state = job_state(record)
        gpu_name = record["device"]["gpu"] if record else ""
        minutes = f"{record['seconds'] / 60:.1f}" if record else ""
        lines.append(f"| {job.name} | {state} | {gpu_name} | {minutes} | {job.about} |")
    first = next((jobs[j.name] for j in JOBS if j.sets_epochs and jobs.get(j.name, {}).get("complete")), None)
    if first:
        ssl = next(e for e in manifest["stages"] if e["stage"] == "ssl_poisoned" and not e.get("variant"))
        history = json.loads((shipped_dir(params.profile) / "ssl_poisoned" / ssl["key"] / "history.json").read_text())
        rates = [h["images_per_s"] for h in history]
        lines += [
            "",
            f"**Training.** {first['epochs']['chosen']} epochs of {first['warmup']['training_images']:,} images "
            f"(the aim: {first['epochs']['aim']}); the backdoored model trained at {min(rates):,.0f}-"
            f"{max(rates):,.0f} img/s per epoch beside the clean model on one {first['device']['gpu']}, its loss "
            f"{history[0]['loss']:.2f} after the first epoch and {history[-1]['loss']:.2f} after the last.",
        ]
    names = {"eval_poisoned": "backdoored (no defense)", "eval_clean": "clean"}
    attacks = [(None, "")] + [  # the profile's attack, then every variant of the attack that has been evaluated
        (overrides, f" of the variant `{name}` ({_overrides_text(overrides)}; the clean model with its trigger)")
        for name, overrides in params.variants.items()
        if set(overrides) == {"attack"}
    ]
    for overrides, which in attacks:
        evals = shipped_evaluations(params.profile, overrides)
        if not set(names) <= set(evals):
            continue
        probes = {stage: pd.read_csv(evals[stage] / "probe.csv") for stage in names}
        knns = {stage: json.loads((evals[stage] / "knn.json").read_text()) for stage in names}
        fractions = params.eval.label_fractions
        table = pd.DataFrame(
            [table2_row(name, probes[stage], knns[stage], f) for f in fractions for stage, name in names.items()]
        )
        lines += [
            "",
            f"**The backdoor{which}** (the paper's Table 2: linear probe, mean ± sd over probe seeds; one SSL seed):",
        ]
        lines += ["", markdown_table(table).rstrip("\n"), ""]
        for fraction in fractions:
            v = _verdict(probes, fraction)
            ratio = f"{v['asr'] / v['clean_asr']:.1f}x" if v["clean_asr"] > 0 else "no ratio: the clean model's is 0"
            lines.append(
                f"- {fraction:.0%} labels: ASR {100 * v['asr']:.1f}% against the clean model's "
                f"{100 * v['clean_asr']:.1f}% ({ratio}): "
                f"{'planted' if v['planted'] else 'not planted'} by the project's rule ({planted_rule()})."
            )
    return "\n".join(lines) + "\n"


def _overrides_text(overrides: dict) -> str:
    """``{"attack": {"poison_rate": 1.0}}`` -> ``attack.poison_rate = 1.0``."""
    return ", ".join(
        f"{section}.{key} = {value}" for section, values in overrides.items() for key, value in values.items()
    )


# ------------------------------------------------------------------- the tree that travels (git index only)
EXCLUDE_MARK = "# helpers.runners.gpu: shipped checkpoints out of the tree for a GPU call"


def untrack_checkpoints() -> list[str]:
    """Take ``figures/*/checkpoints`` out of git's index and ignore them, so the tree that travels to the GPU
    stays under 64 MiB (the files stay on disk); ``restore`` undoes it."""
    tracked = [p for p in _git("ls-files", "figures/*/checkpoints/*").splitlines() if p]
    folders = sorted({"/".join(p.split("/")[:3]) for p in tracked})
    if folders:
        subprocess.run(["git", "rm", "-r", "--cached", "-q", "--", *folders], cwd=paths.REPO_ROOT, check=True)
    exclude = paths.REPO_ROOT / ".git" / "info" / "exclude"
    text = exclude.read_text() if exclude.is_file() else ""
    if EXCLUDE_MARK not in text:
        exclude.write_text(text + f"\n{EXCLUDE_MARK}\n/figures/*/checkpoints/\n")
    return folders


def restore() -> None:
    """Undo ``untrack_checkpoints``: the index as the last commit has it for those folders, the ignore gone."""
    subprocess.run(["git", "reset", "-q", "--", "figures"], cwd=paths.REPO_ROOT, check=False)
    exclude = paths.REPO_ROOT / ".git" / "info" / "exclude"
    if exclude.is_file() and EXCLUDE_MARK in exclude.read_text():
        text = exclude.read_text().replace(f"\n{EXCLUDE_MARK}\n/figures/*/checkpoints/\n", "")
        exclude.write_text(text)


def travelling_bytes() -> int:
    """What the device tool would copy: tracked files, untracked files git does not ignore, and ``.gpu``."""
    listed = _git("ls-files", "--cached", "--others", "--exclude-standard").splitlines()
    total = sum((paths.REPO_ROOT / p).stat().st_size for p in listed if (paths.REPO_ROOT / p).is_file())
    return total + sum(p.stat().st_size for p in STAGING.rglob("*") if p.is_file())


DEVICE_COMMAND = 'PYTHONUNBUFFERED=1 python3 -m helpers.runners.gpu run --out "$OUT"'


def status(params_path: Path = PARAMS) -> str:
    from ..params import load

    manifest = read_manifest(load(params_path).profile)
    lines = []
    for job in JOBS:
        record = manifest.get("jobs", {}).get(job.name)
        state = job_state(record)
        extra = f", {record['seconds'] / 60:.1f} min on {record['device']['gpu']}" if record else ""
        lines.append(f"{job.name} ({state}{extra}): {job.about}")
    job = next_job(manifest)
    lines.append(f"next: {job.name if job else 'none, the queue is done'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    for name in ("status", "prepare", "install", "restore", "report"):
        p = sub.add_parser(name)
        p.add_argument("--params", default=str(PARAMS))
        if name == "prepare":
            p.add_argument("--job", default=None, help="this job instead of the next one not done")
        if name == "install":
            p.add_argument("folder", help="the folder the device's files came back to (job.json and the parts)")
    p = sub.add_parser("run", help="on the GPU: run the prepared job")
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds the job may take")
    p.add_argument("--rate", type=float, default=None,
                   help="images/s each training gets, measured by an earlier run on this GPU: no warm-up")  # fmt: skip
    p = sub.add_parser("warmup", help="one timed SSL warm-up (what run starts side by side)")
    p.add_argument("--params", required=True)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    from ..params import load

    try:
        if args.action == "status":
            print(status(Path(args.params)))
        elif args.action == "prepare":
            description = prepare(Path(args.params), job_name=args.job)
            folders = untrack_checkpoints()
            size = travelling_bytes()
            print(f"job {description['job']}: {description['about']}")
            carried = ", ".join(description["carried"]) or "nothing"
            print(f"carried: {carried}; data pack {description['data']['packed_bytes'] / 2**20:.1f} MiB")
            if description["carried_partial"]:
                print(f"resumed where its last try stopped: {', '.join(description['carried_partial'])}")
            print(
                "out of git's index until `python -m helpers.runners.gpu install` (or restore): "
                f"{', '.join(folders) or 'none'}"
            )
            print(f"the tree that travels: {size / 2**20:.1f} MiB of 64")
            print(f"device run: command {DEVICE_COMMAND!r}, carry ['.gpu'], timeout_s 600")
            if size > 64 * 2**20:
                raise QueueError("the tree that travels is over 64 MiB: it would be refused")
        elif args.action == "run":
            record = run(Path(args.out), budget_s=args.budget, rate=args.rate)
            print(json.dumps({k: record[k] for k in ("job", "complete", "seconds", "stages", "partial")}, indent=1))
        elif args.action == "warmup":
            print(json.dumps({"images_per_s": warmup_rate(Path(args.params), args.steps, args.threads)}))
        elif args.action == "install":
            record = install(Path(args.folder), Path(args.params))
            restore()
            print(f"installed job {record['job']} ({'complete' if record['complete'] else 'ran out of time'}): "
                  f"{len(record['stages'])} stages into {shipped_dir(load(args.params).profile)}")  # fmt: skip
        elif args.action == "report":
            dest = shipped_dir(load(args.params).profile).parent / REPORT_NAME
            io.write_text(dest, queue_report(Path(args.params)))
            print(f"wrote {dest}")
        else:
            restore()
    except QueueError as e:
        raise SystemExit(f"helpers.runners.gpu {args.action}: {e}") from None


if __name__ == "__main__":
    main()
