"""The federation's protocol (common/protocol.py): every message type travels between the real ServerApp loop
(server_app.run) and the real ClientApp handlers (client_app.build_app), packed and unpacked by the protocol's
helpers on both sides, with the client's work (client/trainer.py) replaced by stand-ins that record what
they were asked; a whole run takes about a second. Also: the names are declared once, in protocol.py."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict

import fake_federation
from fedhydra.client import client_app
from fedhydra.common import protocol as p
from fedhydra.common import settings
from fedhydra.common.hydra import digest
from fedhydra.common.metrics import metric_stats, metrics_from_stats
from fedhydra.common.tasks import get_task
from fedhydra.server import server_app

TASK = "LaMP_2M"
TRAIN_NODES, TEST_NODE = (11, 12, 13), 14
ROOT = Path(__file__).resolve().parents[1]


class StandInState:
    """What the handlers read of a client's state folder: its users per role and the task."""

    def __init__(self, node: int):
        self.node, self.task, self.folder = node, get_task(TASK), f"state-{node}"

    def user_ids(self, role: str) -> list[str]:
        train = self.node != TEST_NODE
        return [f"u{self.node}"] if (role == "train") == train else []


class StandInTrainer:
    """client/trainer.py's entry points, recording their arguments; train moves each array by node/1000."""

    def __init__(self):
        self.installed, self.trained, self.calibrated, self.evaluated = [], [], [], []

    def train_round(self, state, llm, cfg, module, shared, server_round, reranker_digest="", proximal_mu=0.0,
                    say=None, privacy=None, lr_span=(1.0, 0.0)):
        self.trained.append({"node": state.node, "module": module, "round": server_round, "keys": sorted(shared),
                             "digest": reranker_digest, "proximal_mu": proximal_mu, "lr_span": lr_span})
        metrics = {p.NUM_EXAMPLES: 4, p.USERS: 1, p.LOSS: 0.5, p.ACCURACY: 0.25, p.LLM_CALLS: 2, p.TOKENS: 30,
                   p.CACHE_HITS: 1, p.SECONDS: 0.1}
        return {k: v + state.node / 1000 for k, v in shared.items()}, metrics

    def install(self, state, cfg, shared):
        self.installed.append({"node": state.node, "digest": digest(shared), "keys": sorted(shared)})

    def calibration_sums(self, state, llm, cfg, adapter, say=None):
        self.calibrated.append({"node": state.node, "keys": sorted(adapter)})
        return {"margin:0": 1.0, "margin:off": 0.0, "queries": 1.0}  # margin 0 wins on every client

    def fit_and_evaluate(self, state, llm, cfg, shared, margin, say=None):
        self.evaluated.append({"node": state.node, "keys": sorted(shared), "margin": margin})
        return metric_stats(TASK, ["comedy"], ["comedy"]), {p.USERS: 1, p.LLM_CALLS: 3, p.TOKENS: 40, p.CACHE_HITS: 0,
                                                            p.SECONDS: 0.2}


class ProtocolFederation(fake_federation.NodesGrid):
    """The real ClientApp on every node, each message delivered as a copy; every message and reply kept."""

    def __init__(self, values: dict):
        super().__init__((*TRAIN_NODES, TEST_NODE))
        self.app = client_app.build_app()
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": n}, state=RecordDict(),
                                    run_config=dict(values)) for n in self.nodes}
        self.log: list[tuple[Message, Message]] = []

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            m = copy.deepcopy(m)
            reply = self.app(m, self.contexts[m.metadata.dst_node_id])
            assert not reply.has_error(), reply.error.reason
            self.log.append((m, reply))
            out.append(reply)
        return out

    def of_kind(self, kind: p.Kind) -> list[tuple[Message, Message]]:
        return [(m, r) for m, r in self.log if m.metadata.message_type == kind.message_type]


@pytest.fixture
def run(tmp_path, monkeypatch):
    """server_app.run over the ProtocolFederation; returns (federated.json, the federation, the stand-in)."""
    def go(**extra):
        fake_federation.enter_run(monkeypatch)
        fake_federation.small_models(monkeypatch)
        stand_in = StandInTrainer()
        for name in ("train_round", "install", "calibration_sums", "fit_and_evaluate"):
            monkeypatch.setattr(client_app.trainer, name, getattr(stand_in, name))
        monkeypatch.setattr(client_app.trainer, "client_llm", lambda state, values: None)
        monkeypatch.setattr(client_app, "client_state", lambda values: StandInState(int(values["partition-id"])))
        values = settings.resolve({"task": TASK, "clients": 3, "test-clients": 1, "rounds": 2, "train-layers": 1,
                                   "adapter-margin": "auto", "min-nodes": 4, "node-wait": 5.0, "round-timeout": 30.0,
                                   "out": str(tmp_path)}, extra)
        fed = ProtocolFederation(values)
        return server_app.run(fed, values), fed, stand_in
    return go


def test_every_message_type_travels_and_is_understood(run):
    doc, fed, stand_in = run()
    assert {m.metadata.message_type for m, _ in fed.log} == {k.message_type for k in p.KINDS}
    assert doc["status"] == "done" and doc["nodes"] == {"train": 3, "test": 1}
    # DESCRIBE: each node's users reached the server
    assert len(fed.of_kind(p.DESCRIBE)) == 4
    assert all(p.Description.unpack(r) == p.Description(int(m.metadata.dst_node_id != TEST_NODE),
                                                         int(m.metadata.dst_node_id == TEST_NODE), TASK)
               for m, r in fed.of_kind(p.DESCRIBE))
    # TRAIN: one module a message, one round number (Flower's, the module's own), the run's round on the client
    trains = fed.of_kind(p.TRAIN)
    assert len(trains) == 3 * 4
    for m, r in trains:
        config = dict(m.content[p.CONFIG])
        assert set(config) == {p.MODULE, p.SERVER_ROUND, p.RERANKER_DIGEST}, config
        assert 1 <= config[p.SERVER_ROUND] <= 2
        assert sorted(p.arrays_of(r)) == sorted(p.arrays_of(m)) == sorted(p.of_module(p.arrays_of(m), config[p.MODULE]))
    assert [(t["module"], t["round"]) for t in stand_in.trained if t["node"] == 11] == \
        [("reranker", 1), ("reranker", 2), ("adapter", 3), ("adapter", 4)]
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3, 4]
    assert all(r["clients"] == 3 and r["examples"] == 12 and r["llm_calls"] == 6 for r in doc["rounds"])
    # INSTALL: the final reranker, once per train client, before the adapter rounds that check its digest
    assert [i["node"] for i in stand_in.installed] == list(TRAIN_NODES)
    assert all(i["keys"] and all(k.startswith("reranker/") for k in i["keys"]) for i in stand_in.installed)
    assert {t["digest"] for t in stand_in.trained if t["module"] == "adapter"} == {stand_in.installed[0]["digest"]}
    assert {t["digest"] for t in stand_in.trained if t["module"] == "reranker"} == {""}
    assert all(p.metrics_of(r) == {p.INSTALLED: len(i["keys"])} for (_, r), i in
               zip(fed.of_kind(p.INSTALL), stand_in.installed))
    # CALIBRATE: the adapter goes to the train clients; their sums chose margin 0
    assert [c["node"] for c in stand_in.calibrated] == list(TRAIN_NODES)
    assert all(k.startswith("adapter/") for c in stand_in.calibrated for k in c["keys"])
    assert doc["calibration"]["margin"] == 0.0 and doc["calibration"]["queries"] == 3
    # EVALUATE: both modules and the margin go to the test client; its statistics become the run's metrics
    (ev,) = stand_in.evaluated
    assert ev["node"] == TEST_NODE and ev["margin"] == 0.0
    assert {k.split("/")[0] for k in ev["keys"]} == set(p.MODULES)
    assert doc["evaluation"]["metrics"] == metrics_from_stats(TASK, metric_stats(TASK, ["comedy"], ["comedy"]))
    assert doc["evaluation"]["users"] == 1 and doc["evaluation"]["llm_calls"] == 3


def test_fedprox_mu_and_a_greedy_margin_reach_the_client(run):
    doc, fed, stand_in = run(strategy="fedprox", **{"proximal-mu": 0.25, "adapter-margin": "off"})
    assert {t["proximal_mu"] for t in stand_in.trained} == {0.25}  # Flower's FedProx key, read by TrainRequest
    assert not fed.of_kind(p.CALIBRATE) and doc["margin"] == "off"
    assert [e["margin"] for e in stand_in.evaluated] == [None]  # greedy answers: no margin
    (msg, _), = fed.of_kind(p.EVALUATE)
    assert p.evaluate_margin(msg) is None


@pytest.mark.parametrize("schedule, spans", [("run", [(1.0, 0.5), (0.5, 0.0)] * 2), ("round", [(1.0, 0.0)] * 4)])
def test_the_lr_schedule_reaches_each_clients_rounds(run, schedule, spans):
    doc, fed, stand_in = run(**{"lr-schedule": schedule})
    assert doc["status"] == "done"
    for node in TRAIN_NODES:
        assert [tuple(t["lr_span"]) for t in stand_in.trained if t["node"] == node] == spans


def test_round_numbers_map_both_ways_and_a_disagreement_is_refused():
    rounds = 3
    runs = [p.run_round(m, r, rounds) for m in p.MODULES for r in range(1, rounds + 1)]
    assert runs == list(range(1, len(p.MODULES) * rounds + 1))
    assert [p.module_round(r, rounds) for r in runs] == [(m, r) for m in p.MODULES for r in range(1, rounds + 1)]
    with pytest.raises(ValueError, match="disagree on rounds"):
        p.run_round(p.ADAPTER, 4, rounds)
    with pytest.raises(ValueError, match="unknown module"):
        p.run_round("encoder", 1, rounds)
    fake_federation.enter_run(pytest.MonkeyPatch())
    config = p.train_config(p.ADAPTER, "abc")
    config[p.SERVER_ROUND] = 2  # what Flower's strategy adds
    msg = Message(RecordDict({p.ARRAYS: p.array_record({"adapter/base/w": np.ones(2, np.float32)}),
                              p.CONFIG: config}), dst_node_id=1, message_type=p.TRAIN.message_type)
    ask = p.TrainRequest.unpack(msg, rounds)
    assert (ask.module, ask.server_round, ask.reranker_digest, ask.proximal_mu) == (p.ADAPTER, 5, "abc", 0.0)
    np.testing.assert_array_equal(ask.arrays["adapter/base/w"], np.ones(2))
    with pytest.raises(ValueError, match="disagree on rounds"):
        p.TrainRequest.unpack(msg, 1)


def test_message_kinds_and_answer_modes_are_flowers_and_the_services():
    assert {k.category for k in p.KINDS} == {MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY}
    assert len({k.message_type for k in p.KINDS}) == len(p.KINDS)
    from fedhydra.proto import personalizer_v1_pb2 as pb

    assert {pb.Mode.Name(v) for v in pb.Mode.values()} == {"MODE_UNSPECIFIED"} | {f"MODE_{m.upper()}"
                                                                                 for m in p.ANSWER_MODES}
    assert set(p.MODULES) < set(p.ANSWER_MODES)


# Names the protocol declares whose string may appear nowhere else in the source. Left out: common words that
# also name other things (a record called "config", a results field "users"), and setting names (a DP reply
# reports dp-clip under the setting's own name; FedProx's proximal-mu is also the setting): settings.py
# declares those, and code reads them as settings.
GENERIC = {"arrays", "config", "metrics", "module", "margin", "task", "users", "loss", "accuracy", "tokens",
           "seconds", "installed", "base", "query", "train", "evaluate"}


def _protocol_strings() -> set[str]:
    from fedhydra.common.settings import SETTINGS

    values = set()
    for name, value in vars(p).items():
        if name.isupper() and isinstance(value, str):
            values.add(value)
        elif isinstance(value, p.Kind):
            values |= {value.message_type, value.action} - {""}
    return values - GENERIC - set(SETTINGS)


def test_each_protocol_name_is_declared_once():
    sources = [f for d in ("cli", "client", "common", "server", "simulations") for f in (ROOT / d).rglob("*.py")]
    assert len(sources) > 50 and {"reranker", "adapter", "full", "server-round", "stat:"} <= _protocol_strings()
    elsewhere = {}
    for value in sorted(_protocol_strings()):
        pattern = re.compile(r"""["']""" + re.escape(value) + r"""["']""")
        hits = [f"{f.relative_to(ROOT)}:{n}" for f in sources if f.name != "protocol.py"
                for n, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
        if hits:
            elsewhere[value] = hits
    assert not elsewhere, f"protocol names written out again outside common/protocol.py: {elsewhere}"
