"""Flower's strategies over FedHydra's shared arrays: aggregation and its weighting, client sampling among the
train clients, the strategy state a checkpoint carries, and a checkpoint refusing other settings."""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from fedhydra.common import settings
from fedhydra.server import checkpoint
from fake_federation import NodesGrid, enter_run
from fedhydra.server.strategy import NodeSubset, load_state_arrays, make_strategy, state_arrays

KEYS = ("adapter/base/w", "adapter/default-head/b")


def reply(arrays: dict[str, np.ndarray], examples: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": examples, "loss": 1.0})})
    return Message(content, dst_node_id=0, message_type="train")


def arrays(value: float) -> dict[str, np.ndarray]:
    return {KEYS[0]: np.full((2, 3), value, dtype=np.float32), KEYS[1]: np.array([value, -value], dtype=np.float32)}


START = arrays(0.0)


@pytest.fixture(autouse=True)
def run_identity(monkeypatch):
    enter_run(monkeypatch)


def replies() -> list[Message]:
    return [reply(arrays(1.0), 1), reply(arrays(5.0), 3)]


def _aggregate(strategy, server_round=1) -> dict[str, np.ndarray]:
    list(strategy.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in START.items()}),
                                  ConfigRecord({}), NodesGrid([1, 2])))
    record, _ = strategy.aggregate_train(server_round, replies())
    return {k: a.numpy() for k, a in record.items()}


def test_fedavg_is_the_example_weighted_mean():
    got = _aggregate(make_strategy(settings.defaults()))
    expected = {k: (1 * arrays(1.0)[k] + 3 * arrays(5.0)[k]) / 4 for k in KEYS}  # by hand: (1 + 15) / 4 = 4
    for k in KEYS:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6)
    assert got[KEYS[0]][0, 0] == pytest.approx(4.0)


def test_two_strategies_aggregate_the_same_replies_differently():
    fedavg = _aggregate(make_strategy(settings.defaults()))
    fedavgm = _aggregate(make_strategy({**settings.defaults(), "strategy": "fedavgm", "server-lr": 0.5}))
    fedadam = _aggregate(make_strategy({**settings.defaults(), "strategy": "fedadam"}))
    # FedAvgM with server lr 0.5: halfway from the start (0) to the mean (4)
    assert fedavgm[KEYS[0]][0, 0] == pytest.approx(2.0)
    assert not np.allclose(fedavg[KEYS[0]], fedadam[KEYS[0]]) and not np.allclose(fedavg[KEYS[0]], fedavgm[KEYS[0]])


def test_make_strategy_reads_the_federation_settings():
    assert type(make_strategy(settings.defaults())) is FedAvg
    prox = make_strategy({**settings.defaults(), "strategy": "fedprox", "proximal-mu": 0.3})
    assert isinstance(prox, FedProx) and prox.proximal_mu == 0.3
    adam = make_strategy({**settings.defaults(), "strategy": "fedadam", "server-momentum": 0.5})
    assert isinstance(adam, FedAdam) and adam.eta == 1e-3 and adam.beta_1 == 0.5
    avgm = make_strategy({**settings.defaults(), "strategy": "fedavgm"})
    assert isinstance(avgm, FedAvgM) and avgm.server_learning_rate == 1.0
    assert make_strategy({**settings.defaults(), "fraction-train": 0.5}).fraction_train == 0.5


def test_sampling_is_among_train_clients_and_follows_the_seeded_round():
    grid = NodeSubset(NodesGrid(range(1, 11)), [2, 3, 4, 5, 6, 7])  # nodes 8-10: test clients, 1: gone
    strategy = make_strategy({**settings.defaults(), "fraction-train": 0.5})
    record = ArrayRecord({k: Array(v) for k, v in START.items()})

    def sample(round_seed: str) -> list[int]:
        random.seed(round_seed)  # what server_app.train_round does before each round
        return sorted(m.metadata.dst_node_id for m in strategy.configure_train(1, record, ConfigRecord({}), grid))

    first = sample("0:1")
    assert len(first) == 3 and set(first) <= {2, 3, 4, 5, 6, 7}
    assert sample("0:1") == first  # the same (seed, round): the same clients, so a resumed run samples alike
    assert len({tuple(sample(f"0:{r}")) for r in range(2, 12)}) > 1


@pytest.mark.parametrize("name", ["fedadam", "fedavgm"])
def test_strategy_state_survives_a_checkpoint(name, tmp_path):
    values = {**settings.defaults(), "strategy": name, "server-lr": 0.1}
    a = make_strategy(values)
    _aggregate(a, 1)
    state = state_arrays(a)
    assert state  # momentum / moments exist after one round
    checkpoint.save(tmp_path, 1, START, "fp", [], state)
    _, _, loaded, _ = checkpoint.load(tmp_path, "fp")
    b = make_strategy(values)
    load_state_arrays(b, loaded)
    next_a, next_b = _aggregate(a, 2), _aggregate(b, 2)
    for k in KEYS:
        np.testing.assert_allclose(next_a[k], next_b[k], rtol=1e-6)


def test_checkpoint_refuses_another_configuration(tmp_path):
    values = settings.defaults()
    fp = checkpoint.fingerprint(values)
    checkpoint.save(tmp_path, 2, START, fp, [{"round": 1}, {"round": 2}])
    assert checkpoint.load(tmp_path, fp)[0] == 2
    assert checkpoint.fingerprint({**values, "resume": True, "out": "/elsewhere", "round-timeout": 5.0}) == fp
    for changed in ({"rounds": 4}, {"strategy": "fedprox"}, {"seed": 1}, {"candidates": 3}):
        with pytest.raises(ValueError, match="other settings"):
            checkpoint.load(tmp_path, checkpoint.fingerprint({**values, **changed}))
    assert checkpoint.load(tmp_path / "none", fp) is None
