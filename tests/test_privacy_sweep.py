"""`fedhydra privacy-sweep`'s parts that need no federated run: its budgets, table and plot."""

from __future__ import annotations

import math

import pytest

from fedhydra.simulations.privacy_sweep import parse_epsilons, plot_sweep, sweep_table


def test_budgets_always_include_the_non_private_reference_first():
    assert parse_epsilons("inf,8,4,1") == [math.inf, 8.0, 4.0, 1.0]
    assert parse_epsilons("8, 0.5") == [math.inf, 8.0, 0.5]
    assert parse_epsilons("4,off") == [4.0, math.inf]


@pytest.mark.parametrize("text, message", [("", "empty"), ("8,abc", "'abc' is not a number"),
                                           ("8,-1", "'-1' must be positive"), ("0", "'0' must be positive"),
                                           ("8,8", "'8' is given twice")])
def test_bad_budgets_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_epsilons(text)


def _doc() -> dict:
    rows = [{"epsilon": "inf", "mode": "off", "status": "done", "rouge-1": 0.32, "epsilon_spent": None,
             "item_epsilon": None, "users": 30},
            {"epsilon": "8", "mode": "record", "status": "done", "rouge-1": 0.3431, "epsilon_spent": 7.998,
             "item_epsilon": 37.75, "users": 30},
            {"epsilon": "1", "mode": "record", "status": "privacy budget exhausted", "rouge-1": None,
             "epsilon_spent": 0.996, "item_epsilon": 3.57, "users": 0}]
    return {"task": "LaMP_7", "metric": "rouge-1", "mode": "record", "rows": rows,
            "references": {"hydra-fed (no DP)": 0.32, "rag-2": 0.3722}}


def test_table_shows_each_budget_what_it_spent_and_the_references():
    lines = sweep_table(_doc()).splitlines()
    assert "| 8 | record | 0.3431 | 7.998 | 37.75 | done |" in lines
    assert "| 1 | record | - | 0.996 | 3.57 | privacy budget exhausted |" in lines
    assert "| inf | off | 0.3200 | - | - | done |" in lines
    assert "- reference, rag-2: 0.3722" in lines and "- reference, hydra-fed (no DP): 0.3200" in lines


def test_plot_is_a_png(tmp_path):
    path = plot_sweep(_doc(), tmp_path / "sweep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
