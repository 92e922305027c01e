"""The pins agree everywhere: requirements/, environment.yml, constraints."""

import re

import yaml

from helpers import paths

REQ = paths.REPO_ROOT / "requirements"


def pins(path):
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-r"):
            continue
        name, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line).groups()
        out[name.lower()] = version
    return out


def test_every_requirement_is_pinned_exactly():
    for name in ("base.txt", "cpu.txt", "gpu.txt", "constraints.txt"):
        for line in (REQ / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            assert not line or line.startswith("-r") or "==" in line, f"{name}: unpinned '{line}'"


def test_constraints_agree_with_base():
    constraints, base = pins(REQ / "constraints.txt"), pins(REQ / "base.txt")
    assert set(constraints) == {"torch", "torchvision"}
    assert all(base[k] == v for k, v in constraints.items())


def test_environment_yml_matches_the_gpu_pins():
    env = yaml.safe_load((paths.REPO_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    env_pins = dict(line.lower().split("==") for line in pip_section)
    expected = pins(REQ / "base.txt") | pins(REQ / "gpu.txt")
    assert env_pins == expected
    assert "faiss-cpu" not in env_pins  # both wheels ship the `faiss` module: never both
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"])


def test_faiss_cpu_and_gpu_never_together():
    cpu, gpu = pins(REQ / "cpu.txt"), pins(REQ / "gpu.txt")
    assert "faiss-cpu" in cpu and "faiss-gpu" not in cpu
    assert "faiss-gpu" in gpu and "faiss-cpu" not in gpu
    assert cpu["faiss-cpu"] == gpu["faiss-gpu"]
    assert not any(name.startswith("faiss") for name in pins(REQ / "base.txt"))


def test_make_refuses_an_unsupported_python_in_one_line(tmp_path):
    """The Makefile checks the interpreter before it makes the venv: here with a list of supported versions
    that leaves out the running one (as 3.10 is left out of the real list)."""
    import shutil
    import subprocess
    import sys

    shutil.copy(paths.REPO_ROOT / "Makefile", tmp_path / "Makefile")
    for name in ("requirements/constraints.txt", "requirements/base.txt", "requirements/cpu.txt", "pyproject.toml"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    cmd = ["make", "-s", "venv", f"PYTHON={sys.executable}", "SUPPORTED_PYTHONS=3.99", "VENV=venv"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    (line,) = [x for x in result.stderr.splitlines() if not x.startswith("make")]
    assert f"is Python {sys.version_info[0]}.{sys.version_info[1]}: this project supports Python 3.99" in line
    assert not (tmp_path / "venv").exists()
    assert "3.11 3.12 3.13" in (paths.REPO_ROOT / "Makefile").read_text()  # the real list


def test_make_passes_paths_with_spaces_whole():
    """``make -n`` prints the commands: a params file or data root with a space reaches Python as one argument."""
    import shlex
    import subprocess

    for target, var, value in (
        ("reproduce", "DATA_ROOT", "/tmp/my data/cifar10"),
        ("reproduce", "PARAMS", "params/my profile.yaml"),
        ("bench", "DATA_ROOT", "/tmp/my data/cifar10"),
        ("gpu-install", "FROM", "/tmp/from here"),
    ):
        result = subprocess.run(
            ["make", "-n", "-o", ".venv/.installed-stamp", target, f"{var}={value}"],
            cwd=paths.REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        lines = result.stdout.replace("\\\n", " ").splitlines()  # continuation lines joined
        line = next(x for x in lines if "helpers." in x)
        assert value in shlex.split(line), (target, line)
