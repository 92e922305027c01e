"""The lab page (``notebooks/lab.md``): its timetable fills the lab, its code parses, its solutions stay hidden.

A teacher plans the class from the page: the minutes per notebook must add up to the length of the lab, every
code block must at least parse, and every exercise's solution must sit behind a toggle (``<details>``, which
the book renders collapsed without any Sphinx extension) so that students see the question first."""

import ast
import re

import pytest

from helpers import paths

LAB = paths.NOTEBOOKS_DIR / "lab.md"
LAB_MINUTES = 90
ROW = re.compile(r"^\|\s*\[(\d\d) · [^\]]*\]\([^)]*\)\s*\|\s*`(\d+)`\s*\|", re.M)  # | [01 · Title](link) | `10` |
TOTAL = re.compile(r"^\|\s*\*\*Total\*\*\s*\|\s*`(\d+)`\s*\|", re.M)
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
TOGGLE = re.compile(r"<details>\s*<summary>Solution</summary>(.*?)</details>", re.S)

pytestmark = pytest.mark.skipif(not LAB.is_file(), reason="no lab page")


def minutes(page: str) -> dict[str, int]:
    """The timetable: minutes per notebook number ("01" ...)."""
    return {number: int(m) for number, m in ROW.findall(page)}


def exercises(page: str) -> dict[str, str]:
    """The exercises: each ``### `` heading under ``## Exercises``, with its text."""
    part = page.split("\n## Exercises", 1)[1].split("\n## ", 1)[0]
    sections = re.split(r"^### (.*)$", part, flags=re.M)
    return {sections[i].strip(): sections[i + 1] for i in range(1, len(sections), 2)}


def hidden_solution_problems(title: str, text: str) -> list[str]:
    """What is wrong with one exercise's solution: none, or not exactly one toggle, or code outside it."""
    toggles = TOGGLE.findall(text)
    if len(toggles) != 1:
        return [f"{title}: {len(toggles)} solution toggles, want one"]
    outside = FENCE.findall(TOGGLE.sub("", text))
    problems = [f"{title}: a code block outside the solution toggle" for _ in outside]
    if not FENCE.findall(toggles[0]):
        problems.append(f"{title}: the solution toggle holds no code")
    return problems


def test_the_minutes_fill_the_lab():
    page = LAB.read_text()
    table = minutes(page)
    notebooks = sorted(p.name[:2] for p in paths.notebooks())
    assert sorted(table) == notebooks, f"the timetable lists {sorted(table)}, the notebooks are {notebooks}"
    assert sum(table.values()) == LAB_MINUTES, f"the minutes add up to {sum(table.values())}, not {LAB_MINUTES}"
    assert [int(t) for t in TOTAL.findall(page)] == [LAB_MINUTES], "the Total row must say the lab's minutes"


def test_every_exercise_is_in_class_and_its_solution_is_hidden():
    page = LAB.read_text()
    found = exercises(page)
    assert found, "the lab page has no exercises"
    in_class = {number for number, m in minutes(page).items() if m > 0}
    for title in found:
        assert title[:2] in in_class, f"exercise {title!r} belongs to no notebook of the in-class path"
    problems = [p for title, text in found.items() for p in hidden_solution_problems(title, text)]
    assert not problems, "\n".join(problems)
    assert page.count("<details>") == page.count("</details>") == len(found), "a toggle is unbalanced"


def test_every_code_block_parses():
    blocks = [code for lang, code in FENCE.findall(LAB.read_text()) if lang == "python"]
    assert blocks, "the lab page has no Python code"
    for code in blocks:
        ast.parse(code)  # a SyntaxError names the line


def test_the_checks_catch_a_visible_solution_and_a_short_timetable():
    shown = "Predict.\n\n```python\nprint(1)\n```\n"
    assert hidden_solution_problems("x", shown) == ["x: 0 solution toggles, want one"]
    leak = "```python\nx = 1\n```\n<details>\n<summary>Solution</summary>\n\n```python\nx\n```\n\n</details>\n"
    assert hidden_solution_problems("x", leak) == ["x: a code block outside the solution toggle"]
    assert sum(minutes("| [01 · A](01_a.ipynb) | `10` | e |\n| [02 · B](02_b.ipynb) | `5` | f |\n").values()) == 15
