"""Notebook pairs agree, and every notebook runs end to end on the smoke profile (papermill)."""

import dataclasses
import json
import re

import jupytext
import nbformat
import pandas as pd
import pytest
import torch

from helpers import notebook, params, paths
from helpers.runners import reproduce


def cells(notebook):
    return [(c.cell_type, c.source.strip(), sorted(c.metadata.get("tags", []))) for c in notebook.cells]


@pytest.mark.parametrize("source", paths.notebooks(), ids=lambda p: p.name)
def test_pair_is_in_sync(source):
    pair = source.with_suffix(".ipynb")
    assert pair.is_file(), f"{pair.name} missing: run `make sync`"
    assert cells(jupytext.read(source)) == cells(jupytext.read(pair)), f"{pair.name} out of sync: run `make sync`"


@pytest.mark.parametrize("source", paths.notebooks(), ids=lambda p: p.name)
def test_one_literal_parameters_cell(source):
    tagged = [c for c in jupytext.read(source).cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].source.strip().startswith("params_path = ")


@pytest.mark.notebooks
def test_smoke_profile_runs_every_notebook(tmp_path):
    run_dir = reproduce.run(paths.PARAMS_DIR / "smoke.yaml", progress=False)
    smoke = params.load(paths.PARAMS_DIR / "smoke.yaml")
    executed = sorted(p.stem for p in run_dir.glob("*.ipynb"))
    assert executed == [p.stem for p in paths.notebooks()]
    figures = run_dir / "figures"  # a run that does not publish writes its own folder, never the reference
    assert not paths.published_dir("smoke").exists()
    for name in ("trigger", "poisoned_train", "patched_val", "trigger_locations"):
        assert (figures / f"01_attack_{name}.png").stat().st_size > 1000
    counts = dict(line.split(",", 1) for line in (figures / "01_attack_counts.csv").read_text().splitlines()[1:])
    assert counts["poisoned_images"] == "20" and counts["train_images"] == "400"
    assert counts["val_patched_images"] == "180"
    table2 = pd.read_csv(figures / "07_evaluation_table2.csv")
    models = ["Clean", "Backdoored", "Clean + i-CutMix", "Backdoored + i-CutMix"]
    models += ["PatchSearch", "PatchSearch + i-CutMix", "PoisonCAM"]
    assert table2["model"].tolist() == models * 2
    assert table2["labels"].tolist() == ["1%"] * 7 + ["10%"] * 7
    per_seed = pd.read_csv(figures / "07_evaluation_table2_per_seed.csv")
    assert len(per_seed) == 7 * 2 * 2  # models x label fractions x probe seeds of the smoke profile
    assert ((per_seed["asr"] >= 0) & (per_seed["asr"] <= 1)).all()
    assert (per_seed["patched_fp"] == (per_seed["asr"] * 180).round()).all()  # ASR = FP / non-target images
    for name in ("loss", "embedding", "neighbours", "views"):
        assert (figures / f"02_ssl_training_{name}.png").is_file()
    table1 = pd.read_csv(figures / "07_evaluation_table1.csv")
    assert table1["method"].tolist() == ["PatchSearch"] * 2 + ["PoisonCAM"] * 2
    assert table1["ensemble"].tolist() == ["mean", "unanimous"] * 2
    assert (table1["poisons"] == 20).all() and (table1["total removed"] <= 400).all()
    assert ((table1["recall (%)"] >= 0) & (table1["recall (%)"] <= 100)).all()
    # a unanimous ensemble removes a subset of what the mean of the same logits removes
    totals = table1.pivot(index="method", columns="ensemble", values="total removed")
    assert (totals["unanimous"] <= totals["mean"]).all()
    rules = pd.read_csv(figures / "06_poison_classifier_ensemble_rules.csv")
    assert (
        rules.set_index(["method", "ensemble"])["removed"].to_dict()
        == table1.set_index(["method", "ensemble"])["total removed"].to_dict()
    )
    sweep = pd.read_csv(figures / "05_search_window_sweep.csv")
    assert sweep["used"].sum() == 2 and sweep["RSD pick"].sum() == 2  # one of each per method
    rule = {"rsd": "RSD"}.get(smoke.search.window_rule, smoke.search.window_rule)  # the profile's rule picks w
    assert sweep[f"{rule} pick"].sum() == 2 and (sweep[f"{rule} pick"] == sweep["used"]).all()
    assert (sweep["pooled sd"] >= 0).all()  # the pooled rule's spread over its draws
    # every localization number stands beside the centre and random guesses of the same side
    for column in ("centre window hit (%)", "random window hit (%)", "clean removed (%)"):
        assert table1[column].between(0, 100).all(), column
    localization = pd.read_csv(figures / "04_trigger_localization_localization_accuracy.csv")
    assert {"patchsearch", "poisoncam", "centre window", "random window"} <= set(localization.columns)
    centre = pd.read_csv(figures / "01_attack_centre_guess.csv")
    assert centre["centre window hits"].between(0, 1).all() and centre["random window hits"].between(0, 1).all()
    table10 = pd.read_csv(figures / "07_evaluation_table10_clean_data.csv")
    assert (table10["training images"] == 400).all() and table10["ensemble"].tolist() == ["mean", "unanimous"] * 2
    for name in (
        "03_clustering_cluster_sizes",
        "04_trigger_localization_heatmaps",
        "05_search_window_rsd",
        "06_poison_classifier_proxy_f1",
        "07_evaluation_precision_recall",
        "08_more_defenses_kd_tradeoff",
        "08_more_defenses_icutmix_ablation",
    ):
        assert (figures / f"{name}.png").stat().st_size > 1000
    record = json.loads((figures / "record.json").read_text())
    assert record["profile"] == "smoke" and record["params_file"] == "params/smoke.yaml"
    assert set(record["notebook_seconds"]) == set(executed)
    # the pipeline computed every stage before the notebooks: each task's and each stage's time is recorded
    from helpers.runners import pipeline

    variants, names = pipeline.notebook_tasks(smoke.variants)
    assert variants == ("byol", "repeated")
    assert set(record["pipeline_task_seconds"]) == {t.name for t in pipeline.select(pipeline.tasks(variants), names)}
    byol = pd.read_csv(figures / "07_evaluation_table2_byol.csv")
    assert byol["model"].tolist()[:6] == [m for m in models if m != "PoisonCAM"] and len(byol) == 12
    # notebook 08: every table has its rows, ours beside the paper's
    t3 = pd.read_csv(figures / "08_more_defenses_table3_kd.csv")
    assert t3["trusted data"].tolist()[:7] == ["100%", "0%", "25%", "10%", "5%", "0%", "0%"]
    t4 = pd.read_csv(figures / "08_more_defenses_table4_finetuning.csv")
    assert sorted(set(t4["evaluation"])) == ["finetuned", "linear"] and len(t4) == 4 * 2 * 2
    t8 = pd.read_csv(figures / "08_more_defenses_table8_icutmix.csv")
    assert len(t8) == 7 * 2 and t8["ASR (%)"].between(0, 100).all()
    coverage = pd.read_csv(figures / "08_more_defenses_icutmix_coverage.csv").set_index("per query view")
    assert coverage.loc["views with a trigger (%)"].between(0, 100).all()
    t9 = pd.read_csv(figures / "08_more_defenses_table9_repeated.csv")
    assert t9["model"].tolist()[:4] == ["Clean", "Backdoored", "PatchSearch", "PoisonCAM"]
    t10 = pd.read_csv(figures / "08_more_defenses_table10_retrained.csv")
    assert t10["training images"].iloc[0] == 400 and (t10["training images"].iloc[1:3] < 400).all()
    computed = {d["stage"] for d in record["stage_seconds"]}
    assert {"data", "attack", "ssl_poisoned", "search_poisoned", "classifier_clean", "ssl_filtered"} <= computed
    assert record["wall_seconds"] >= sum(record["notebook_seconds"].values())
    assert "Stages computed in this run" in (figures / "RECORD.md").read_text()


def test_publish_notebook_keeps_outputs_and_drops_the_run(tmp_path):
    """A published notebook shows its outputs, not the run's temporary params path or timings, and stays the
    pair of its source."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell('params_path = "params/cifar10.yaml"', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell('params_path = "/tmp/run/params.yaml"', metadata={"tags": ["injected-parameters"]}),
        nbformat.v4.new_code_cell("1 + 1", execution_count=3, metadata={"papermill": {"duration": 0.1}}),
    ]
    nb.cells[2].outputs = [
        nbformat.v4.new_output("display_data", {reproduce.WIDGET_MIME: {"model_id": "x"}, "text/plain": "bar 0%"}),
        nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=3),
    ]
    nb.metadata["widgets"] = {"state": {}}
    nb.metadata["papermill"] = {"parameters": {"params_path": "/tmp/run/params.yaml"}}
    executed = tmp_path / "run.ipynb"
    nbformat.write(nb, executed)
    reproduce.publish_notebook(executed, tmp_path / "pair.ipynb")
    text = (tmp_path / "pair.ipynb").read_text()
    assert "/tmp/run" not in text and "papermill" not in text and "widget" not in text
    out = nbformat.read(tmp_path / "pair.ipynb", as_version=4)
    assert [c.source for c in out.cells] == ['params_path = "params/cifar10.yaml"', "1 + 1"]
    assert [o["data"]["text/plain"] for o in out.cells[1].outputs] == ["2"] and out.cells[1].execution_count is None
    assert [c.id for c in out.cells] == ["cell-000", "cell-001"]  # the same ids on every run


def test_setup_overrides_change_one_key_and_refuse_unknown_ones():
    p = notebook.setup("params/smoke.yaml", overrides={"cluster": {"k": 7}})
    base = params.load(paths.PARAMS_DIR / "smoke.yaml")
    assert p.cluster.k == 7 and p.cluster.iterations == base.cluster.iterations and p.search == base.search
    with pytest.raises(params.ParamsError, match="unknown key 'cluster.kk'"):
        notebook.setup("params/smoke.yaml", overrides={"cluster": {"kk": 7}})
    with pytest.raises(ValueError, match="'clusters' is not a section"):
        notebook.setup("params/smoke.yaml", overrides={"clusters": {"k": 7}})


def test_a_notebooks_own_passes_run_fp32_only_where_bf16_would_be_emulated(monkeypatch):
    """The profile's bf16 keys its stages on every machine (the shipped ones); a notebook's own uncached passes
    run in ``live_precision``: bf16 where the CPU has it natively, fp32 where it would be emulated (notebook 04's
    PoisonCAM sample went from seconds to hours there), and never change a stage's key."""
    from helpers import compute

    monkeypatch.setattr(compute, "device_for_run", lambda: torch.device("cpu"))
    p = params.load(paths.PARAMS_DIR / "cifar10.yaml")
    fp32 = dataclasses.replace(p, compute=dataclasses.replace(p.compute, precision="fp32"))
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(compute, "cpu_has_native_bf16", lambda native=native: native)
        assert notebook.live_precision(p) == expected and notebook.live(p).compute.precision == expected
        assert notebook.live_precision(fp32) == "fp32"
        assert notebook.live(p).compute.ssl_precision == "bf16"  # the SSL model it loads keeps its key
        assert params.stage_hash(notebook.live(p), "ssl_poisoned") == params.stage_hash(p, "ssl_poisoned")
    # every notebook's own network pass goes through it
    for source in paths.notebooks():
        text = source.read_text()
        assert "precision=P.compute.precision" not in text, source.name
        for line in re.findall(r"^ *(\w+) = search\.defense_context\(.*$", text, flags=re.M):
            assert f"{line}.model.precision = notebook.live_precision(P)" in text, source.name


def test_outputs_never_go_to_the_published_folder_by_default(monkeypatch):
    monkeypatch.delenv(paths.OUTPUT_ENV, raising=False)
    assert paths.figures_dir("cifar10") == paths.runs_dir() / "cifar10" / "figures"
    assert paths.figures_dir("cifar10") != paths.published_dir("cifar10")
    monkeypatch.setenv(paths.OUTPUT_ENV, str(paths.published_dir("cifar10")))  # what reproduce --publish sets
    assert paths.figures_dir("cifar10") == paths.published_dir("cifar10")


@pytest.mark.parametrize("notebook", sorted(p.name for p in paths.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb")))
def test_published_outputs_hold_no_cache_log_and_no_machine_path(notebook):
    """What a reader sees is the same on every machine: no "cache hit" line (``notebook.setup`` leaves them
    out unless asked) and no absolute path of the machine that ran it (``paths.shown``)."""
    nb = nbformat.read(paths.NOTEBOOKS_DIR / notebook, as_version=4)
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            texts.append(out.get("text", "") if isinstance(out.get("text", ""), str) else "".join(out["text"]))
            texts += [
                v if isinstance(v, str) else "".join(v) for k, v in out.get("data", {}).items() if k.startswith("text/")
            ]
    text = "\n".join(texts)
    assert "cache hit" not in text, notebook
    machine = re.findall(r"(?:^|[\s'\"(])(/(?:work|root|home|tmp|Users|private|var)/[^\s'\")]+)", text)
    assert not machine, (notebook, machine[:3])


def test_shown_paths_are_the_same_on_every_machine():
    assert paths.shown(paths.REPO_ROOT / "artifacts" / "attack") == "artifacts/attack"
    assert paths.shown("/somewhere/else/data/cifar10") == "…/data/cifar10"
    assert paths.shown("relative/path") == "relative/path"
    assert paths.repo_relative("/somewhere/else/data/cifar10") == "/somewhere/else/data/cifar10"  # read back


# What fits the book's text width: a table of at most MAX_COLUMNS columns (its index, where shown, counts as
# one) and a figure at most MAX_ASPECT times as wide as it is tall (wider figures are scaled down until their
# text is too small to read). Limits of the page, not of the results: they hold for any profile.
MAX_COLUMNS = notebook.MAX_COLUMNS  # what notebook.show_table splits at
MAX_ASPECT = 3.0


def page_fit_problems(nb) -> list[str]:
    """Every output of an executed notebook that does not fit the page: a table wider than ``MAX_COLUMNS``
    (HTML or Markdown), a table that shows the DataFrame's index, or a PNG wider than ``MAX_ASPECT``."""
    import base64
    import io

    from PIL import Image

    problems = []
    for number, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "image/png" in data:
                width, height = Image.open(io.BytesIO(base64.b64decode(data["image/png"]))).size
                if width / height > MAX_ASPECT:
                    problems.append(f"cell {number}: figure {width} x {height} px (aspect {width / height:.1f})")
            html = data.get("text/html", "")
            html = html if isinstance(html, str) else "".join(html)
            for table in re.findall(r"<table.*?</table>", html, re.S):
                header = re.search(r"<tr.*?</tr>", table, re.S).group(0)
                columns = len(re.findall(r"<t[hd][\s>]", header))
                if columns > MAX_COLUMNS:
                    problems.append(f"cell {number}: HTML table of {columns} columns")
                if re.search(r"<tbody>\s*<tr>\s*<th", table):
                    problems.append(f"cell {number}: HTML table shows its index")
            markdown = data.get("text/markdown", "")
            markdown = markdown if isinstance(markdown, str) else "".join(markdown)
            for line in markdown.splitlines():
                if re.match(r"^\|.*\|$", line.strip()) and not re.match(r"^\|[\s:|-]+\|$", line.strip()):
                    columns = line.strip().count("|") - 1
                    if columns > MAX_COLUMNS:
                        problems.append(f"cell {number}: Markdown table of {columns} columns")
                        break
    return problems


@pytest.mark.parametrize("notebook", sorted(p.name for p in paths.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb")))
def test_published_tables_and_figures_fit_the_page(notebook):
    problems = page_fit_problems(nbformat.read(paths.NOTEBOOKS_DIR / notebook, as_version=4))
    assert not problems, (notebook, problems)


def test_the_page_fit_check_fails_on_a_wide_table_an_index_and_a_wide_figure():
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wide = pd.DataFrame([range(9)], columns=[f"c{i}" for i in range(9)])
    narrow = pd.DataFrame([range(3)], columns=["a", "b", "c"])
    buffer = io.BytesIO()
    fig = plt.figure(figsize=(8, 2))
    fig.savefig(buffer, format="png", dpi=50)
    plt.close(fig)
    png = base64.b64encode(buffer.getvalue()).decode()
    outputs = [
        {"output_type": "display_data", "metadata": {}, "data": {"text/html": wide.to_html(index=False)}},
        {"output_type": "display_data", "metadata": {}, "data": {"text/html": narrow.to_html()}},  # index shown
        {"output_type": "display_data", "metadata": {}, "data": {"text/markdown": "| a | b |\n|---|---|\n| 1 | 2 |"}},
        {"output_type": "display_data", "metadata": {}, "data": {"image/png": png}},
        {"output_type": "display_data", "metadata": {}, "data": {"text/html": narrow.to_html(index=False)}},
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[o]) for o in outputs])
    problems = page_fit_problems(nb)
    assert problems == [
        "cell 0: HTML table of 9 columns",
        "cell 1: HTML table shows its index",
        "cell 3: figure 400 x 100 px (aspect 4.0)",
    ]


# A code cell a student reads in full is short or is a stage's idea written out (``readable``); a longer cell
# that builds prose, a table or a figure is plumbing: the book folds it away (``hide-input``) or drops it.
MAX_SHOWN_LINES = 20


@pytest.mark.parametrize("source", paths.notebooks(), ids=lambda p: p.name)
def test_long_code_cells_are_readable_or_folded(source):
    nb = jupytext.read(source)
    long = [
        (number, len(c.source.splitlines()))
        for number, c in enumerate(nb.cells)
        if c.cell_type == "code"
        and len(c.source.splitlines()) > MAX_SHOWN_LINES
        and not {"readable", "hide-input", "remove-input"} & set(c.metadata.get("tags", []))
    ]
    assert not long, (source.name, long)


def test_published_figures_fit_the_page():
    """The figure files too (the landing page shows some; the studies' runners write others)."""
    from PIL import Image

    wide = {}
    for png in sorted(paths.published_dir("cifar10").glob("*.png")):
        width, height = Image.open(png).size
        if width / height > MAX_ASPECT:
            wide[png.name] = round(width / height, 1)
    assert not wide, wide


def test_a_shown_table_fits_the_page_formatted_and_without_index():
    table = pd.DataFrame(
        {"method": ["a", "b"], "w": [12, 14], "share": [0.8125, 97.84], "ok": [True, False], "n": [12345.0, None]}
    )
    html = notebook.table_html(table)
    cells = re.findall(r"<td>(.*?)</td>", html)
    assert cells == ["a", "12", "0.812", "yes", "12,345", "b", "14", "97.8", "no", "–"]
    assert "<th></th>" not in html and not page_fit_problems(
        nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[_html_output(html)])])
    )
    wide = pd.DataFrame([["x", "y", *range(11)]], columns=["key", "label", *[f"c{i}" for i in range(11)]])
    parts = notebook.split_columns(wide)
    assert [list(p.columns)[:2] for p in parts] == [["key", "label"]] * len(parts)  # the keys repeat
    assert all(len(p.columns) <= notebook.MAX_COLUMNS for p in parts)
    assert sum(len(p.columns) - 2 for p in parts) == 11  # every other column, once
    assert list(notebook.split_columns(table.set_index("method"))[0].columns)[0] == "method"  # a named index stays


def _html_output(html):
    return {"output_type": "display_data", "metadata": {}, "data": {"text/html": html}}


def test_a_gap_is_called_only_beyond_two_standard_errors_of_the_seeds():
    from helpers.notebook import gap_verdict

    a = [10.0, 10.2, 9.8, 10.1, 9.9]  # standard error of the difference: 0.1 over five seeds each
    assert gap_verdict([x + 0.1 for x in a], a) == "within noise"
    assert gap_verdict([x + 1.0 for x in a], a) == "higher"
    assert gap_verdict([x - 1.0 for x in a], a) == "lower"
    # a wider spread hides the same gap
    assert gap_verdict([x + 1.0 for x in (5, 15, 10, 12, 8)], [5, 15, 10, 12, 8]) == "within noise"
    assert gap_verdict([1.0], a) == "undecided (one seed)"  # no spread to judge the gap by
