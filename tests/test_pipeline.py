import pytest

from helpers import pipeline


def test_every_task_needs_only_known_tasks_and_prepare_comes_first():
    graph = pipeline.tasks()
    names = [t.name for t in graph]
    assert len(names) == len(set(names)) and names[0] == "prepare"
    seen = set()
    for task in graph:  # listed in an order that respects the dependencies
        assert set(task.deps) <= seen, task.name
        seen.add(task.name)
    assert {"ssl_poisoned", "defense_poisoncam_poisoned", "ssl_filtered_patchsearch_icutmix"} <= seen


def test_select_keeps_what_the_chosen_tasks_need():
    chosen = {t.name for t in pipeline.select(pipeline.tasks(), ["eval_filtered_poisoncam"])}
    assert chosen == {
        "prepare",
        "ssl_poisoned",
        "defense_poisoncam_poisoned",
        "ssl_filtered_poisoncam",
        "eval_filtered_poisoncam",
    }
    with pytest.raises(ValueError, match="unknown pipeline task"):
        pipeline.select(pipeline.tasks(), ["ssl_dirty"])


def test_the_longest_chain_starts_first():
    priority = pipeline._priorities(pipeline.tasks())
    # the poisoned model leads to the defenses and the retrainings: it must start before the clean one
    assert priority["ssl_poisoned"] > priority["ssl_clean"] > priority["ssl_clean_icutmix"]
    assert priority["prepare"] == max(priority.values())
