import dataclasses

import pytest

from helpers import paper, params, paths
from helpers.params import ParamsError


@pytest.mark.parametrize("profile", ["smoke", "cifar10", "imagenet100"])
def test_every_profile_validates(profile):
    p = params.load(paths.PARAMS_DIR / f"{profile}.yaml")
    assert p.profile == profile


def test_profiles_set_every_key_explicitly():
    """A profile spells out every field, so a reader sees the whole setting in one file."""
    for path in sorted(set(paths.PARAMS_DIR.glob("*.yaml")) - {paper.PAPER_FILE}):  # paper.yaml: not a profile
        raw = params.yaml.safe_load(path.read_text())
        for section in ("data", "attack", "ssl", "eval", "cluster", "search", "classifier", "figures"):
            fields = {f.name for f in dataclasses.fields(type(getattr(params.load(path), section)))}
            assert set(raw[section]) == fields, f"{path.name}: {section} misses {fields - set(raw[section])}"


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("profile: x\nattack:\n  poison_rat: 0.5\n")
    with pytest.raises(ParamsError, match=r"p.yaml: unknown key 'attack.poison_rat'"):
        params.load(path)
    path.write_text("profile: x\nattak: {}\n")
    with pytest.raises(ParamsError, match=r"unknown key 'attak'"):
        params.load(path)


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("attack:\n  poison_rate: half", "attack.poison_rate"),
        ("attack:\n  n_copies: 1.5", "attack.n_copies"),
        ("attack:\n  n_copies: true", "attack.n_copies"),
        ("data:\n  train_per_class: '10'", "data.train_per_class"),
        ("data: 3", "data"),
        ("profile: 7", "profile"),
    ],
)
def test_wrong_type_is_named(tmp_path, yaml_text, key):
    path = tmp_path / "p.yaml"
    path.write_text(("profile: x\n" if not yaml_text.startswith("profile") else "") + yaml_text + "\n")
    with pytest.raises(ParamsError, match=rf"p.yaml: .*'{key}'"):
        params.load(path)


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("attack", "poison_rate", 0.0),
        ("attack", "poison_rate", 1.5),
        ("attack", "trigger_size", 1.0),
        ("attack", "train_margin", 0.5),
        ("attack", "n_copies", 0),
        ("data", "image_size", 0),
        ("cluster", "k", 0),
        ("search", "prune_fraction", 0.0),
        ("search", "mask_keep", 1.0),
        ("search", "masks", 0),
        ("classifier", "exclude_top", 1.0),
        ("classifier", "patience", 0),
    ],
)
def test_out_of_range_is_named(section, key, value):
    with pytest.raises(ParamsError, match=rf"'{section}.{key}' = .* out of range"):
        params.from_dict({"profile": "x", section: {key: value}}, "src")


def test_missing_profile_and_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="missing required key 'profile'"):
        params.from_dict({}, "src")
    with pytest.raises(ParamsError, match="params file not found"):
        params.load(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("profile: [unclosed\n")
    with pytest.raises(ParamsError, match="bad.yaml: not valid YAML"):
        params.load(tmp_path / "bad.yaml")


def test_int_is_accepted_for_float_and_null_for_optional():
    p = params.from_dict({"profile": "x", "attack": {"poison_rate": 1}, "data": {"image_size": None}})
    assert p.attack.poison_rate == 1.0 and isinstance(p.attack.poison_rate, float)


def test_data_root_precedence(tmp_path, monkeypatch, tiny_root):
    other = tmp_path / "other"
    other.mkdir()
    p = params.from_dict({"profile": "x", "data": {"root": str(tiny_root)}})
    monkeypatch.setenv("PATCHSEARCH_DATA_ROOT", str(other))
    assert params.resolve_data_root(p) == tiny_root.resolve()  # the params file wins
    p_default = params.from_dict({"profile": "x"})
    assert params.resolve_data_root(p_default) == other.resolve()  # then the environment
    monkeypatch.setenv("PATCHSEARCH_DATA_ROOT", str(tmp_path / "missing"))
    with pytest.raises(paths.DataError, match=r"data root not found: .*missing \(from \$PATCHSEARCH_DATA_ROOT\)"):
        params.resolve_data_root(p_default)


def test_absent_default_root_says_how_to_get_the_data(monkeypatch, tmp_path):
    monkeypatch.setitem(paths.DEFAULT_DATA_ROOTS, "cifar10", [tmp_path / "none"])
    with pytest.raises(paths.DataError, match="no data root for dataset 'cifar10'.*make data"):
        params.resolve_data_root(params.from_dict({"profile": "x"}))


def test_stage_hash_reads_only_its_sections():
    base = params.from_dict({"profile": "x"})
    other_attack = dataclasses.replace(base, attack=dataclasses.replace(base.attack, poison_rate=1.0))
    other_figures = dataclasses.replace(base, figures=dataclasses.replace(base.figures, dpi=10), profile="y")
    assert params.stage_hash(base, "data") == params.stage_hash(other_attack, "data")
    assert params.stage_hash(base, "attack") != params.stage_hash(other_attack, "attack")
    assert params.stage_hash(base, "attack") == params.stage_hash(other_figures, "attack")


def test_defense_choices_are_named():
    with pytest.raises(ParamsError, match="'search.method' = 'patchserch' must be one of patchsearch, poisoncam"):
        params.from_dict({"profile": "x", "search": {"method": "patchserch"}}, "src")
    with pytest.raises(ParamsError, match="'search.mask_strategy'"):
        params.from_dict({"profile": "x", "search": {"mask_strategy": "grid"}}, "src")
    with pytest.raises(ParamsError, match="'search.cam_layer'"):
        params.from_dict({"profile": "x", "search": {"cam_layer": "layer5"}}, "src")
    with pytest.raises(ParamsError, match="'search.window_sweep'"):
        params.from_dict({"profile": "x", "search": {"window_px": None, "window_sweep": []}}, "src")
    with pytest.raises(ParamsError, match=r"'search.window_top_k' = 1 is out of range: must be in \[2, inf\)"):
        params.from_dict({"profile": "x", "search": {"window_top_k": 1}}, "src")
    with pytest.raises(
        ParamsError,
        match="'search.window_rule' = 'variance' is out of range: must be one of rsd, contrast, agreement, pooled",
    ):
        params.from_dict({"profile": "x", "search": {"window_rule": "variance"}}, "src")


def test_the_window_rules_read_only_the_search_section():
    """The blind rules' candidate count is a search key: changing the classifier must not re-run the search."""
    base = params.from_dict({"profile": "x"})
    other_classifier = dataclasses.replace(base, classifier=dataclasses.replace(base.classifier, top_k=7))
    fewer = dataclasses.replace(base, search=dataclasses.replace(base.search, window_top_k=7))
    assert params.stage_hash(base, "search_poisoned") == params.stage_hash(other_classifier, "search_poisoned")
    assert params.stage_hash(base, "search_poisoned") != params.stage_hash(fewer, "search_poisoned")


def test_defense_stages_hash_their_sections():
    base = params.from_dict({"profile": "x"})
    poisoncam = dataclasses.replace(base, search=dataclasses.replace(base.search, method="poisoncam"))
    assert params.stage_hash(base, "cluster_poisoned") == params.stage_hash(poisoncam, "cluster_poisoned")
    assert params.stage_hash(base, "search_poisoned") != params.stage_hash(poisoncam, "search_poisoned")
    assert params.stage_hash(base, "ssl_filtered") != params.stage_hash(poisoncam, "ssl_filtered")
    assert params.stage_hash(base, "ssl_poisoned") == params.stage_hash(poisoncam, "ssl_poisoned")


def test_poisoncams_count_enters_only_poisoncams_stages():
    base = params.from_dict({"profile": "x"})
    poisoncam = dataclasses.replace(base, search=dataclasses.replace(base.search, method="poisoncam"))

    def flat(p):
        return dataclasses.replace(p, search=dataclasses.replace(p.search, poisoncam_score="into_vs_flat"))

    for stage in ("search_poisoned", "classifier_poisoned", "ssl_filtered"):  # PatchSearch never reads it
        assert params.stage_hash(base, stage) == params.stage_hash(flat(base), stage)
        assert params.stage_hash(poisoncam, stage) != params.stage_hash(flat(poisoncam), stage)
    assert (
        "poisoncam_score" not in params.stage_params(poisoncam, "search_poisoned")["search"]
    )  # its paper's: as before
    with pytest.raises(ParamsError, match="'search.poisoncam_score' = 'into_flat'.*changed_vs_flat or toward_vs_flat"):
        params.from_dict({"profile": "x", "search": {"poisoncam_score": "into_flat"}}, "src")
    with pytest.raises(ParamsError, match="'search.score_rule' = 'all'"):
        params.from_dict({"profile": "x", "search": {"score_rule": "all"}}, "src")


def _numeric_keys(cls=params.Params, where=""):
    """(``section.key``, its type) of every key of the schema that holds numbers."""
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name, annotation = f"{where}.{f.name}" if where else f.name, hints[f.name]
        if dataclasses.is_dataclass(annotation):
            yield from _numeric_keys(annotation, name)
            continue
        kinds = {a for a in (annotation, *typing.get_args(annotation)) if a in (int, float)}
        if kinds:
            yield name, float if float in kinds else int


def test_every_numeric_key_has_a_range_that_refuses_values_outside_it():
    keys = dict(_numeric_keys())
    assert sorted(keys) == sorted(params.RANGES), "a numeric key without a range in params.RANGES (or a stale one)"
    for key, kind in keys.items():
        rule = params.RANGES[key]
        interval = rule[0] if isinstance(rule, tuple) else rule
        lo = float(interval[1:-1].split(",")[0])
        outside = lo if interval[0] == "(" else lo - (1 if kind is int else 0.5)
        outside = int(outside) if kind is int else outside
        section, name = key.split(".")
        is_list = isinstance(getattr(getattr(params.Params(profile="x"), section), name), list)
        for value in [outside] + ([float("nan")] if kind is float else []):
            with pytest.raises(ParamsError, match=rf"'{key}' = .* out of range"):
                params.from_dict({"profile": "x", section: {name: [value] if is_list else value}}, "src")


def test_scientific_notation_is_a_number():
    p = params.from_dict({"profile": "x", "ssl": {"lr": "1e-3", "weight_decay": "5E-4"}, "eval": {"probe_lr": 1}})
    assert (p.ssl.lr, p.ssl.weight_decay, p.eval.probe_lr) == (0.001, 0.0005, 1.0)
    with pytest.raises(ParamsError, match=r"'ssl.lr' must be float, got 'fast'"):
        params.from_dict({"profile": "x", "ssl": {"lr": "fast"}})


@pytest.mark.parametrize("name", ["../../..", "a/b", "", ".hidden", "x..y", "with space"])
def test_a_profile_name_is_a_plain_name(name):
    with pytest.raises(ParamsError, match=r"'profile' = .* must be a plain name"):
        params.from_dict({"profile": name}, "src")


def test_the_score_rules_params_accepts_are_the_ones_the_search_counts():
    from helpers import search

    assert params.SCORE_RULES == search.SCORE_RULES


def test_networks_narrower_than_one_avx2_register_are_refused_with_why():
    """Under 8 first-stage channels, oneDNN's channels-last 1x1 convolution backward corrupted memory on an AVX2
    CPU (2026-12-08): a segfault, a double free or a hang, never an error. The params refuse it in one line."""
    for section in ("ssl", "classifier"):
        with pytest.raises(params.ParamsError, match=rf"'{section}\.width' = 4 is out of range: must be in \[8, inf\) "
                           r"\(fewer channels crash oneDNN's convolutions on an AVX2 CPU\)"):  # fmt: skip
            params.from_dict({"profile": "x", section: {"width": 4}}, "src")
        assert getattr(params.from_dict({"profile": "x", section: {"width": 8}}, "src"), section).width == 8
