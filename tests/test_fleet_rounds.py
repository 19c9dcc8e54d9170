"""What a real fleet needs from the server's loop (server/server_app.py), on the real loop in one process
(tests/fake_federation.py): it waits for min-nodes and says who is there; a node that joins late is described,
gets the final reranker when it joins during the adapter's rounds, and trains from the next round on."""

from __future__ import annotations

import logging

import pytest

from fake_federation import NODES, FakeFederation, enter_run, small_models, values_for
from fedhydra.server.server_app import run, wait_for_nodes


@pytest.fixture(autouse=True)
def run_identity(monkeypatch):
    enter_run(monkeypatch)
    small_models(monkeypatch)


class LateFederation(FakeFederation):
    """Node 13 connects only once round `joins_after` has been sent."""

    def __init__(self, values, joins_after: int):
        super().__init__(values)
        self.joins_after = joins_after

    def get_node_ids(self):
        late = any(kind == "train" and rnd == self.joins_after for kind, _, rnd in self.sent)
        return list(NODES) if late else [n for n in NODES if n != 13]


def test_a_late_joiner_trains_from_the_next_round(tmp_path, caplog):
    values = values_for(tmp_path, rounds=1, **{"min-nodes": 2})  # round 1: reranker, round 2: adapter
    fed = LateFederation(values, joins_after=1)
    with caplog.at_level(logging.INFO, logger="flwr"):
        doc = run(fed, values)
    assert doc["status"] == "done"
    trained = {(node, rnd) for kind, node, rnd in fed.sent if kind == "train"}
    assert trained == {(11, 1), (12, 1), (11, 2), (12, 2), (13, 2)}
    assert ("query.describe", 13, 0) in fed.sent and ("query.install", 13, 0) in fed.sent  # the final reranker first
    assert [r["clients"] for r in doc["rounds"]] == [2, 3]
    assert "late joiners: [13]" in caplog.text


def test_the_server_waits_for_min_nodes_and_says_who_is_missing(tmp_path, caplog):
    values = values_for(tmp_path, **{"min-nodes": 3, "node-wait": 1.5})
    fed = FakeFederation(values)
    fed.nodes = [11, 12]  # node 13 is not connected
    with caplog.at_level(logging.INFO, logger="flwr"):
        with pytest.raises(RuntimeError, match="only 2 of min-nodes=3 nodes connected"):
            wait_for_nodes(fed, values)
        assert "waiting for nodes: 2 of min-nodes=3 connected [11, 12]" in caplog.text
        # Later rounds go on with those connected after node-wait, naming the known node that is missing.
        assert wait_for_nodes(fed, values, known={11: {}, 12: {}, 13: {}}, must=False) == [11, 12]
    assert "not connected: [13]" in caplog.text
