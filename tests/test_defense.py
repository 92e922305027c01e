"""The defense stages' wiring."""

import pytest

from helpers import defense, params


def test_the_filtered_icutmix_model_uses_the_plain_defense(monkeypatch):
    """'PatchSearch + i-CutMix' retrains with i-CutMix on the list filtered with the plain model's defense."""
    seen = []
    monkeypatch.setattr(defense, "classifier_stage", lambda p, variant, progress: seen.append(p) or _raise())
    base = params.from_dict({"profile": "x", "ssl": {"icutmix": True}})
    with pytest.raises(KeyError):
        defense.kept_indices(base)
    assert seen[0].ssl.icutmix is False and seen[0].search == base.search


def _raise():
    raise KeyError("stop")
