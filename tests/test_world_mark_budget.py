"""benchmarks/world_mark_budget.py: budgets parsed, objects counted, one tiny budget taught end to end."""

from __future__ import annotations

import re

import pytest
from conftest import load_benchmark

from vlmablate.world.pretrain import EMPTY_COLOUR, _vision_data


@pytest.fixture(scope="module")
def budget():
    return load_benchmark("world_mark_budget")


def test_budgets_parse_and_bad_ones_are_named(budget):
    assert budget.parse_budgets("100:16:2e-4,4:2:1e-3") == [(100, 16, 2e-4), (4, 2, 1e-3)]
    for bad in ("100:16", "100:16:x", "0:16:1e-3", "100:16:1e-3:5"):
        with pytest.raises(SystemExit, match=re.escape(repr(bad))):
            budget.parse_budgets(bad)


def test_labelled_objects_are_the_occupied_cells_of_the_teaching_scenes(budget):
    _, targets = _vision_data(0, "vision_taught", 6, 64)
    colour_known = int((targets[:, 0] != EMPTY_COLOUR).sum())  # cells with a colour hold an object
    n = budget.labelled_objects(6, 0, 64)
    assert n == colour_known and 6 <= n <= 30  # one to five objects a scene


def test_a_tiny_budget_runs_and_prints_its_row(budget, capsys):
    rows = budget.main(["--budgets", "2:4:1e-3", "--n-eval", "8", "--threads", "1"])
    (row,) = rows
    assert (row["steps"], row["batch"], row["images"]) == (2, 4, 8)
    assert row["objects"] == budget.labelled_objects(8, 0, 64) and 0.0 <= row["mark"] <= 1.0
    out = capsys.readouterr().out
    assert re.search(r"^\s+2\s+4\s+1e-03\s+8\s+\d+\s+[01]\.\d{3}\s+\d+$", out, flags=re.M)
    import json

    from vlmablate.world.components import shipped_folder

    recorded = json.loads((shipped_folder() / "meta.json").read_text())["vision"]["mark_probe_acc"]
    assert f"frozen linear probe {recorded:.3f}" in out and 0.45 < recorded < 0.55  # blind to the mark: chance
