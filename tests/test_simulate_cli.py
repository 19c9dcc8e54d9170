"""The README's federated example as a new user runs it: `fedhydra simulate` from another working directory,
with relative --data and --out, on a fresh results folder, to the end; and a failing method that does not take
the finished methods' results with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedhydra.common.synthetic import write_synthetic

from conftest import LLM_UNAVAILABLE

FEDHYDRA = str(Path(sys.executable).parent / "fedhydra")
pytestmark = [pytest.mark.llm, pytest.mark.skipif(bool(LLM_UNAVAILABLE), reason=f"embedded LLM: {LLM_UNAVAILABLE}")]
TINY = ["--clients", "2", "--test-clients", "1", "--rounds", "1", "--pseudo-queries", "1", "--retrieve", "2",
        "--k", "1", "--candidates", "2", "--train-layers", "1", "--adapter-label-queries", "2", "--epochs", "1"]


def _fedhydra(cwd: Path, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FEDHYDRA_CACHE_DIR"}
    return subprocess.run([FEDHYDRA, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def test_simulate_with_relative_paths_from_another_folder_runs_to_the_end(tmp_path):
    write_synthetic(tmp_path / "shared" / "synth", n_users=6, seed=3)
    work = tmp_path / "checkout"
    work.mkdir()
    run = _fedhydra(work, "simulate", "--data", "../shared/synth", "--out", "runs/fed", "--cache-dir", "cache",
                    "--methods", "zero-shot,hydra-fed", *TINY)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((work / "runs" / "fed" / "results.json").read_text())
    assert list(results["methods"]) == ["zero-shot", "hydra-fed"]
    assert results["methods"]["hydra-fed"]["users"] == 1
    assert results["settings"]["data"] == str(tmp_path / "shared" / "synth")  # what every process was given
    assert (work / "runs" / "fed" / "clients" / "client-2" / "client.json").is_file()
    assert "llm-threads 1 (automatic share of the cores unless given)" in run.stdout


def test_a_failing_method_leaves_the_finished_results_and_one_error_line(tmp_path):
    write_synthetic(tmp_path / "data", n_users=4, seed=11)
    (tmp_path / "not-an-encoder").mkdir()
    out = tmp_path / "out"
    run = _fedhydra(tmp_path, "evaluate", "--data", "data", "--train-users", "2", "--test-users", "2",
                    "--methods", "zero-shot,hydra", "--encoder", "./not-an-encoder", "--out", "out",
                    "--cache-dir", "cache", "--candidates", "2", "--pseudo-queries", "1", "--retrieve", "2", "--k", "1",
                    timeout=300)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("fedhydra: error: 1 method(s) failed (hydra: ")
    assert "Traceback" not in run.stderr and str(out) in errors[0]
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["zero-shot"] and results["methods"]["zero-shot"]["users"] == 2
    assert set(results["failed"]) == {"hydra"}
    assert "Failed (no result): hydra" in (out / "results.md").read_text()
    assert "Traceback" in (out / "failures.log").read_text()
