"""The stage registry (helpers.stages) against the code it declares."""

import ast
import importlib
import inspect
import json
import re

import pytest

from helpers import fingerprint, params, paths, stages
from helpers.runners import checkpoints, codelock, pipeline


def _names_in(module: str) -> tuple[set[str], set[str]]:
    """The string constants of a helpers module, and the constant beginnings of its f-strings."""
    tree = ast.parse((fingerprint.PACKAGE_DIR / f"{module}.py").read_text())
    constants, prefixes = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            prefixes.add(node.values[0].value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            constants.add(node.value)
    return constants, prefixes


@pytest.mark.parametrize("stage", stages.STAGES, ids=lambda s: s.name)
def test_every_stage_is_computed_where_it_is_declared(stage):
    module, function = stage.compute.split(".")
    assert callable(getattr(importlib.import_module(f"helpers.{module}"), function)), stage.compute
    assert module in stages.code(stage.name), f"{stage.name} is computed in {module}, which its key does not hold"
    # the module names the stage it asks the cache for; a function that computes several stages by the name
    # its caller passes (``assess.evaluate_model_stage(stage, ...)``) is named by a caller in helpers
    generic = next(iter(inspect.signature(getattr(importlib.import_module(f"helpers.{module}"), function)).parameters))
    where = [p.stem for p in fingerprint.PACKAGE_DIR.glob("*.py")] if generic == "stage" else [module]
    named = False
    for name in where:
        constants, prefixes = _names_in(name)
        named |= stage.name in constants or any(p.endswith("_") and stage.name.startswith(p) for p in prefixes)
    assert named, f"helpers/{module}.py never names the stage {stage.name}"


def test_the_registry_is_ordered_upstream_first_and_names_real_things():
    seen = set()
    for stage in stages.STAGES:
        assert set(stage.upstream) <= seen, f"{stage.name} is declared before its upstream {stage.upstream}"
        assert stage.name not in seen
        seen.add(stage.name)
        assert set(stage.reads) <= set(params.Params.__dataclass_fields__), stage.reads
        assert set(stage.runs) <= {p.stem for p in fingerprint.PACKAGE_DIR.glob("*.py")} - fingerprint.NOT_RESULT_CODE
        assert stage.network in (None, "network", "pretraining")
        for name in stage.retired:  # merged into other modules: no file, an identity kept in the lock
            assert not (fingerprint.PACKAGE_DIR / f"{name}.py").exists(), name
            assert fingerprint.read_lock()["modules"][name]["retired"] is True, name
    tasks = {t.name for t in pipeline.tasks()}
    assert {stages.smoke_task(s.name) for s in stages.STAGES} <= tasks


def test_what_names_stages_is_derived_from_the_registry():
    names = [s.name for s in stages.STAGES]
    assert list(params.STAGE_INPUTS) == names and list(fingerprint.STAGE_CODE) == names
    assert list(codelock.STAGE_TASK) == names
    assert checkpoints.SHIPPED_STAGES <= set(names)
    # a stage holds everything upstream of it: its sections and code include its upstream stages'
    for name in names:
        for up in stages.upstream_closure(name):
            assert set(params.STAGE_INPUTS[up]) <= set(params.STAGE_INPUTS[name]), (name, up)
            assert set(fingerprint.STAGE_CODE[up]) <= set(fingerprint.STAGE_CODE[name]), (name, up)
    # examples a reader can check by eye
    assert set(params.STAGE_INPUTS["search_clean"]) == {"data", "ssl", "cluster", "search"}  # never the attack
    assert "attack" in params.STAGE_INPUTS["search_poisoned"]
    assert {"loop", "kd"} <= set(fingerprint.STAGE_CODE["eval_kd"]) and "kd" not in fingerprint.STAGE_CODE["eval_mix"]
    assert {"ssl", "train"} <= set(fingerprint.STAGE_CODE["ssl_clean"])  # train.py merged into ssl.py: kept
    assert "defense" in fingerprint.STAGE_CODE["search_clean"] and "defense" not in fingerprint.STAGE_CODE["eval_clean"]
    assert {"cluster_poisoned", "ssl_poisoned"} <= checkpoints.SHIPPED_STAGES
    assert "data" not in checkpoints.SHIPPED_STAGES
    assert params.PRETRAINING_STAGES == {"ssl_clean", "ssl_poisoned", "ssl_mix"}


def test_the_shipped_keys_survive_the_registry():
    """The registry replaced four hand-written lists. What it decides, the code identity and the params
    sections of every shipped stage's key, must be what the stage was shipped with."""
    path = params.paths.REPO_ROOT / "figures" / "cifar10" / "checkpoints" / checkpoints.MANIFEST
    manifest = json.loads(path.read_text())  # the committed one (tests publish elsewhere)
    assert len(manifest["stages"]) > 50
    profile = params.load(params.paths.PARAMS_DIR / "cifar10.yaml")
    for entry in manifest["stages"]:
        shipped = entry["key_material"]
        material = params.stage_key_material(params.with_overrides(profile, entry["variant"]), entry["stage"])
        assert material["code"] == shipped["code"], entry["stage"]
        assert set(material["params"]) == set(shipped["params"]), entry["stage"]


def test_every_pipeline_task_waits_for_the_stages_its_stages_build_on():
    graph = {t.name: t for t in pipeline.tasks(("byol",))}

    def before(name: str) -> set[str]:  # the stages of every task ``name`` waits for, directly or not
        out, todo = set(), list(graph[name].deps)
        while todo:
            dep = todo.pop()
            out |= set(graph[dep].stages)
            todo += graph[dep].deps
        return out

    for task in graph.values():
        assert task.stages and set(task.stages) <= set(stages.BY_NAME), task.name
        ready = before(task.name)
        for name in task.stages:
            missing = [up for up in stages.BY_NAME[name].upstream if up not in task.stages and up not in ready]
            assert not missing, f"task {task.name} computes {name} without waiting for {missing}"
    for stage in stages.STAGES:  # the renewal's proof reruns the task that computes each stage
        assert stage.name in graph[stages.smoke_task(stage.name)].stages, stage.name


def test_no_helpers_module_imports_itself_back():
    """Data flows one way: no chain of imports (at module level or inside a function) leads a module back
    to itself."""
    graph = {p.stem: fingerprint.helpers_imports(p.stem) for p in fingerprint.PACKAGE_DIR.glob("*.py")}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for nxt in sorted(graph[name]):
            assert state.get(nxt) != "open", "import cycle: " + " -> ".join([*path, name, nxt])
            if nxt in graph and nxt not in state:
                visit(nxt, [*path, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_the_filtered_model_needs_the_defense_list(tiny_params):
    from helpers import cache, ssl

    with pytest.raises(ValueError, match="classify.filtered_model_stage"):
        ssl.train_stage(tiny_params, "filtered", progress=False)
    assert cache.cached_result("ssl_filtered", tiny_params) is None  # nothing cached


def test_stage_modules_never_import_runners_or_studies_and_notebooks_no_study():
    """The package a student reads: stage modules and their plumbing at the top of ``helpers``; the runners
    and the side studies in sub-packages that may import stages, never the other way. Only the notebooks'
    setup (``notebook``) reaches a runner: it installs the shipped checkpoints. Notebooks import stages and
    plumbing, never a study."""
    top = {p.stem for p in fingerprint.PACKAGE_DIR.glob("*.py")}
    for name in sorted(top - {"notebook"}):
        reached = fingerprint.helpers_imports(name) & set(fingerprint.SUBPACKAGES)
        assert not reached, f"helpers/{name}.py imports helpers.{sorted(reached)[0]}"
    for notebook in sorted((paths.REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        imports = re.findall(r"^\s*(?:from|import) (helpers\S*)(?: import ([^\n]+))?", notebook.read_text(), re.M)
        assert imports, notebook.name
        for module, names in imports:
            assert not module.startswith("helpers.studies") and "studies" not in names, (notebook.name, module)
    assert set(fingerprint.SUBPACKAGES) == {p.parent.name for p in fingerprint.PACKAGE_DIR.glob("*/__init__.py")}
