"""`fedhydra evaluate` end to end on synthetic data: results files, and a rerun that costs 0 LLM calls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fedhydra.common.metrics import evaluate
from fedhydra.common.synthetic import write_synthetic
from fedhydra.common.tasks import get_task

from conftest import LLM_UNAVAILABLE

import pytest

FEDHYDRA = str(Path(sys.executable).parent / "fedhydra")
pytestmark = [pytest.mark.llm,
              pytest.mark.skipif(LLM_UNAVAILABLE is not None, reason=f"embedded LLM unavailable: {LLM_UNAVAILABLE}")]


def _evaluate(data: Path, out: Path, cache: Path) -> dict:
    cmd = [FEDHYDRA, "evaluate", "--data", str(data), "--train-users", "2", "--test-users", "2",
           "--methods", "zero-shot,rag-2,hydra-reranker,hydra-adapter,hydra-base,hydra", "--out", str(out),
           "--cache-dir", str(cache), "--preset", "cpu", "--pseudo-queries", "2", "--retrieve", "3",
           "--k", "2", "--candidates", "2", "--epochs", "1", "--label-users", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads((out / "results.json").read_text())


def test_evaluate_writes_results_and_a_rerun_makes_no_llm_call(tmp_path):
    write_synthetic(tmp_path / "data", task="LaMP_2M", n_users=5, seed=11)
    first = _evaluate(tmp_path / "data", tmp_path / "run1", tmp_path / "cache")
    methods = first["methods"]
    assert list(methods) == ["zero-shot", "rag-2", "hydra-reranker", "hydra-adapter", "hydra-base", "hydra"]
    task = get_task("LaMP_2M")
    for name, r in methods.items():  # each method's metrics are those of the predictions it wrote
        rows = [json.loads(line) for line in (tmp_path / "run1" / "predictions" / f"{name}.jsonl").open()]
        assert r["users"] == len(rows) == 2
        assert r["metrics"] == evaluate(task, [row["prediction"] for row in rows], [row["gold"] for row in rows])
    assert first["hydra training"]["llm_calls"] > 0 and first["preset"] == "cpu"
    # the label user's label-set queries train the adapter beside the 2 train users; the reranker never sees them
    assert first["label users"] == 1 and first["train users"] == 2
    assert first["hydra training"]["train"]["adapter"]["users"] == 3
    assert first["hydra training"]["train"]["reranker"]["users"] == 2
    assert (tmp_path / "run1" / "results.md").read_text().count("| hydra") == 4
    assert len((tmp_path / "run1" / "predictions" / "hydra.jsonl").read_text().splitlines()) == 2

    second = _evaluate(tmp_path / "data", tmp_path / "run2", tmp_path / "cache")
    assert second["hydra training"]["llm_calls"] == 0
    assert all(r["llm_calls"] == 0 and r["cache_hits"] > 0 for r in second["methods"].values())
    assert {m: r["metrics"] for m, r in second["methods"].items()} == {m: r["metrics"] for m, r in methods.items()}


def test_evaluate_rejects_bad_arguments_with_one_line(tmp_path):
    write_synthetic(tmp_path / "data", task="LaMP_2M", n_users=4, seed=11)
    for extra, message in ((["--methods", "hydra,gpt-magic"], "unknown method 'gpt-magic'"),
                           (["--train-users", "3", "--test-users", "3"], "users"),
                           (["--task", "LaMP_7"], "--task LaMP_7 but the data is LaMP_2M"),
                           (["--k", "5", "--retrieve", "3"], "k=5 must be between 1 and retrieve"),
                           (["--label-users", "1"], "asked for 1 more users but only 0"),
                           (["--test-users", "1", "--label-users", "1", "--methods", "zero-shot"],
                            "label users only add the hydra adapter's label-set queries")):
        run = subprocess.run([FEDHYDRA, "evaluate", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"),
                              "--train-users", "2", "--test-users", "2", *extra], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert not (tmp_path / "o").exists()
