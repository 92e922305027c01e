"""The cache key follows the code a stage runs and the content of the files it reads."""

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import cache, fingerprint, params, stages


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """A copy of the helpers sources that the fingerprints read instead of the real ones."""
    copy = tmp_path / "helpers_copy"
    shutil.copytree(fingerprint.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fingerprint, "PACKAGE_DIR", copy)
    return copy


def edit(path, old, new):
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1))


def test_code_that_moved_is_caught_and_only_a_bump_changes_keys(tiny_params, package_copy):
    calls = []

    def compute(out, final):
        calls.append(final)

    first = cache.cached_stage("ssl_clean", tiny_params, compute)
    data_key = params.stage_hash(tiny_params, "data")
    # docstrings, comments and layout: the same code, nothing moved, a hit
    edit(package_copy / "ssl.py", '"""Train ``p.method``', '"""Train (reworded) ``p.method``')
    edit(package_copy / "ssl.py", "    rank, world = dist_info()\n", "    rank, world = dist_info()  # a comment\n\n")
    assert fingerprint.moved_modules() == {}
    assert cache.cached_stage("ssl_clean", tiny_params, compute).hit
    # the algorithm: the lock test names the module until it is recorded; a bump is a miss for the stages
    # that run it, a hit for the others
    edit(package_copy / "ssl.py", "torch.manual_seed(p.seed)", "torch.manual_seed(p.seed + 1)")
    assert fingerprint.moved_modules() == {"ssl": "its code changed since the lock"}
    fingerprint.write_lock(["ssl"], new_identity=True)
    assert fingerprint.moved_modules() == {}
    second = cache.cached_stage("ssl_clean", tiny_params, compute)
    assert not second.hit and second.key != first.key and len(calls) == 2
    assert params.stage_hash(tiny_params, "data") == data_key
    # a renewal (results proved unchanged) keeps every key
    before = {stage: params.stage_hash(tiny_params, stage) for stage in params.STAGE_INPUTS}
    edit(package_copy / "search.py", "def relative_std(", "def relative_std_(")
    assert set(fingerprint.moved_modules()) == {"search"}
    fingerprint.write_lock(["search"], new_identity=False, proof="a test")
    assert {stage: params.stage_hash(tiny_params, stage) for stage in params.STAGE_INPUTS} == before
    assert fingerprint.read_lock()["modules"]["search"]["renewed_by"] == "a test"
    # an earlier stage's module bumped: the later stages' keys change, the earlier ones' do not
    edit(package_copy / "attack.py", "rng.integers(x_lo", "1 + rng.integers(x_lo")
    fingerprint.write_lock(["attack"], new_identity=True)
    after = {stage: params.stage_hash(tiny_params, stage) for stage in ("data", "attack", "ssl_poisoned")}
    assert after["data"] == before["data"]
    assert after["attack"] != before["attack"] and after["ssl_poisoned"] != before["ssl_poisoned"]


def test_a_renamed_module_keeps_every_key(tiny_params, package_copy, monkeypatch):
    """A module renamed (its file and every stage that names it): its identity enters keys under its old name,
    so every key stays; its code must still be renewed, as for any other move."""
    before = {stage: params.stage_hash(tiny_params, stage) for stage in params.STAGE_INPUTS}
    (package_copy / "kernels.py").rename(package_copy / "paste.py")
    renamed = {
        stage: tuple("paste" if m == "kernels" else m for m in code) for stage, code in fingerprint.STAGE_CODE.items()
    }
    monkeypatch.setattr(fingerprint, "STAGE_CODE", renamed)
    with pytest.raises(KeyError, match="paste.py is not in"):
        fingerprint.code_fingerprint("attack")
    fingerprint.rename_in_lock("kernels", "paste")
    entry = fingerprint.read_lock()["modules"]["paste"]
    assert entry["key_name"] == "kernels" and "kernels" not in fingerprint.read_lock()["modules"]
    assert {stage: params.stage_hash(tiny_params, stage) for stage in params.STAGE_INPUTS} == before
    assert fingerprint.moved_modules() == {}  # the same code under another name: nothing to renew
    edit(package_copy / "paste.py", "def ", "def unused():\n    return 1\n\n\ndef ")
    assert fingerprint.moved_modules() == {"paste": "its code changed since the lock"}
    fingerprint.write_lock(["paste"], new_identity=False, proof="a test")
    assert {stage: params.stage_hash(tiny_params, stage) for stage in params.STAGE_INPUTS} == before
    fingerprint.write_lock(["paste"], new_identity=True)  # a bump: a new identity, under the new name
    assert "key_name" not in fingerprint.read_lock()["modules"]["paste"]
    assert (
        params.stage_hash(tiny_params, "attack") != before["attack"]
        and params.stage_hash(tiny_params, "data") == before["data"]
    )


def test_a_module_missing_from_the_lock_is_named_with_the_command(package_copy):
    lock = fingerprint.read_lock()
    del lock["modules"]["cluster"]
    fingerprint.lock_path().write_text(json.dumps(lock))
    assert fingerprint.moved_modules() == {"cluster": "not in the lock"}
    with pytest.raises(
        KeyError, match=r"helpers/cluster\.py is not in .*python -m helpers\.runners\.codelock bump cluster"
    ):
        fingerprint.code_fingerprint("search_poisoned")
    assert fingerprint.code_fingerprint("ssl_clean")  # stages that do not run it keep their keys


def test_the_committed_lock_matches_the_code():
    """Every module a stage runs is recorded with its current code. If this fails, you changed result code:
    `python -m helpers.runners.codelock bump <module>` if its results change, else `... renew <module>` (proves it)."""
    assert fingerprint.moved_modules() == {}


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_the_code_fingerprint_is_the_same_on_other_pythons(version):
    """The syntax tree is written as Python 3.11 writes it: 3.12 and 3.13 give the same source fingerprints,
    and every stage's code fingerprint, read from the lock, is the same (it needs neither parsing nor torch).
    Where pyenv has no such Python, the check is skipped."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = sorted(root.glob(f"{version}.*/bin/python{version}")) if root.is_dir() else []
    other = found[-1] if found else shutil.which(f"python{version}")
    if not other:
        pytest.skip(f"no Python {version} on this machine")
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from helpers import fingerprint as f; "
        "print(json.dumps([{n: f.module_fingerprint(n) for n in f.source_modules()}, "
        "{s: f.code_fingerprint(s) for s in f.STAGE_CODE}]))"
    )
    result = subprocess.run(
        [str(other), "-c", script, str(fingerprint.PACKAGE_DIR.parent)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    theirs = json.loads(result.stdout)
    ours = [
        {name: fingerprint.module_fingerprint(name) for name in fingerprint.source_modules()},
        {stage: fingerprint.code_fingerprint(stage) for stage in fingerprint.STAGE_CODE},
    ]
    assert theirs == ours and len(ours[1]) == len(params.STAGE_INPUTS)


def test_notebooks_plotting_and_docs_keep_every_hit(tiny_params, package_copy):
    keys = {stage: params.stage_hash(tiny_params, stage) for stage in params.STAGE_INPUTS}
    edit(package_copy / "plotting.py", "def ", "def unused_helper():\n    return 1\n\n\ndef ")
    edit(package_copy / "runners" / "reproduce.py", "KERNEL_NAME = ", "UNUSED = 1\nKERNEL_NAME = ")
    assert {stage: params.stage_hash(tiny_params, stage) for stage in params.STAGE_INPUTS} == keys


def test_every_module_a_stage_imports_is_in_its_fingerprint():
    """A module that a stage's code imports at module level either enters that stage's key or is declared
    as not computing results; otherwise editing it could serve a stale artifact."""
    every = {p.stem for p in fingerprint.PACKAGE_DIR.glob("*.py")}
    assert fingerprint.NOT_RESULT_CODE <= every
    for stage, modules in fingerprint.STAGE_CODE.items():
        closure, todo = set(), list(modules)
        while todo:
            name = todo.pop()
            if name not in closure:
                closure.add(name)
                if name not in stages.retired():  # merged into other modules: no file to read
                    todo += fingerprint.helpers_imports(name, top_level_only=True)
        missing = closure - set(modules) - fingerprint.NOT_RESULT_CODE
        assert not missing, f"stage {stage} runs code of {sorted(missing)}: add it to STAGE_CODE"
    assert set(fingerprint.STAGE_CODE) == set(params.STAGE_INPUTS)


def test_a_trigger_png_is_keyed_by_content_not_path(tiny_params, tmp_path):
    rng = np.random.default_rng(0)
    png = tmp_path / "a" / "trigger.png"
    png.parent.mkdir()
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(png)
    copy = tmp_path / "b" / "same.png"
    copy.parent.mkdir()
    shutil.copy(png, copy)

    def with_trigger(path):
        return dataclasses.replace(tiny_params, attack=dataclasses.replace(tiny_params.attack, trigger=str(path)))

    key = params.stage_hash(with_trigger(png), "attack")
    assert params.stage_hash(with_trigger(copy), "attack") == key  # a copy elsewhere: the same attack
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(png)  # edited in place
    assert params.stage_hash(with_trigger(png), "attack") != key


def test_the_data_folder_is_keyed_by_its_files(tiny_params, tiny_root):
    key = params.stage_hash(tiny_params, "data")
    assert params.stage_hash(tiny_params, "data") == key
    extra = tiny_root / "train" / "cat" / "new.png"
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(extra)  # an added image
    added = params.stage_hash(tiny_params, "data")
    assert added != key
    first = tiny_root / "train" / "dog" / "000.png"
    stat = first.stat()
    Image.fromarray(np.full((20, 20, 3), 7, dtype=np.uint8)).save(first)  # an image edited in place
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    fingerprint._digests.cache_clear()  # as a new process (the next notebook) sees it
    assert params.stage_hash(tiny_params, "data") not in (key, added)


def test_the_same_files_extracted_again_keep_the_key(tiny_params, tiny_root):
    key = params.stage_hash(tiny_params, "data")
    for path in tiny_root.rglob("*.png"):  # new modification times, as a fresh copy of the folder has
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))
    fingerprint._digests.cache_clear()
    assert params.stage_hash(tiny_params, "data") == key


def test_precision_enters_the_key_of_network_stages_only(tiny_params):
    def with_compute(**changes):
        return dataclasses.replace(tiny_params, compute=dataclasses.replace(tiny_params.compute, **changes))

    fp32, bf16 = with_compute(precision="fp32", ssl_precision="fp32"), with_compute(precision="bf16")
    assert params.stage_hash(bf16, "attack") == params.stage_hash(fp32, "attack")
    # SSL pre-training has its own precision: the inference precision does not retrain the models
    assert params.stage_hash(bf16, "ssl_poisoned") == params.stage_hash(fp32, "ssl_poisoned")
    for stage in ("eval_clean", "search_poisoned", "classifier_clean", "ssl_filtered"):
        assert params.stage_hash(bf16, stage) != params.stage_hash(fp32, stage)
    bf16_training = with_compute(precision="fp32", ssl_precision="bf16")
    for stage in ("ssl_clean", "ssl_poisoned", "eval_poisoned", "search_poisoned", "ssl_filtered"):
        assert params.stage_hash(bf16_training, stage) != params.stage_hash(fp32, stage)
    threads = with_compute(precision="fp32", ssl_precision="fp32", threads=1, compile=True)
    assert params.stage_hash(threads, "ssl_poisoned") == params.stage_hash(fp32, "ssl_poisoned")
