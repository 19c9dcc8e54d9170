"""A client state folder knows the run it was made for: a federation with other settings over the same state root
is refused with a message naming the setting (never trains on another run's users); the same settings reuse it."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedhydra.cli.main import build_parser, command_plan
from fedhydra.client.client_app import client_settings, client_state
from fedhydra.client.state import StateError
from fedhydra.common import settings
from fedhydra.common.synthetic import write_synthetic


def _context(run_config: dict, partition: int, partitions: int) -> Context:
    """What Flower hands a ClientApp of `flwr run`: the run config and the SuperNode's node config."""
    return Context(run_id=1, node_id=100 + partition, state=RecordDict(), run_config=run_config,
                   node_config={"partition-id": partition, "num-partitions": partitions})


def _run(root: Path, data: Path, **changes) -> list:
    """Every client of a federation (2 train + 1 test clients) opens its state folder under `root`: the user ids
    each holds."""
    run_config = settings.resolve({"data": str(data), "clients": 2, "test-clients": 1, "state-root": str(root),
                                   "seed": 0}, changes)
    return [client_state(client_settings(_context(run_config, p, 3))).user_ids() for p in range(3)]


@pytest.fixture()
def data(tmp_path) -> Path:
    write_synthetic(tmp_path / "data", n_users=12, seed=5)
    return tmp_path / "data"


def test_a_second_run_with_another_seed_is_refused_not_trained_on_the_first_runs_users(tmp_path, data):
    root = tmp_path / "clients"
    first = _run(root, data)
    assert _run(root, data) == first  # the same run (a restart, a resume) reuses its folders
    with pytest.raises(StateError, match=r"seed=0.*seed=1.*Delete that folder"):
        _run(root, data, seed=1)
    # with a fresh state root the second run deals other users out, and holds none of the first's folders
    second = _run(tmp_path / "fresh", data, seed=1)
    assert second != first


@pytest.mark.parametrize("change", [{"partitioner": "profile-size"}, {"users-per-client": 2}, {"clients": 1}])
def test_any_setting_that_picks_the_users_is_checked(tmp_path, data, change):
    root = tmp_path / "clients"
    _run(root, data)
    key = next(iter(change))
    with pytest.raises(StateError, match=key):
        _run(root, data, **change)


def test_other_data_is_refused_even_at_the_same_path(tmp_path, data):
    root = tmp_path / "clients"
    _run(root, data)
    write_synthetic(data, n_users=12, seed=6)  # same folder, other content
    with pytest.raises(StateError, match="data-sha256"):
        _run(root, data)


def test_a_relative_data_path_is_refused_by_the_client_with_the_reason(tmp_path):
    run_config = settings.resolve({"data": "../somewhere/LaMP_7", "state-root": str(tmp_path / "clients")})
    with pytest.raises(StateError, match="relative path"):
        client_state(client_settings(_context(run_config, 0, 12)))


def test_simulate_refuses_another_runs_state_before_starting_anything(tmp_path, data):
    out = tmp_path / "out"
    _run(out / "clients", data)  # a federation of seed 0 left its client folders in OUT/clients
    args = build_parser().parse_args(["simulate", "--data", str(data), "--clients", "2", "--test-clients", "1",
                                      "--out", str(out), "--seed", "1", "--methods", "zero-shot,hydra-fed"])
    with pytest.raises(StateError, match="seed=0"):
        command_plan(args)
