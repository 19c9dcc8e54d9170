"""A federation in one process for the server's privacy arithmetic: FedHydra's real ServerApp loop
(server_app.run) and real client-side privacy mods (client_app.train_mods: SecAgg+, the legacy-fit adapter,
Flower's fixed clipping, the metrics filter) around a stand-in trainer, over a Grid that delivers each
message as a copy (as the wire would) to a ClientApp with a persistent Context per node.

The stand-in trainer moves every array by a fixed direction per (node, round) of a chosen norm, so
clipping has something to clip, and returns metrics a real client would (loss, accuracy, counts, costs).
The shared arrays are small stand-ins too (server_app's model construction is patched), so a whole run
takes a fraction of a second.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedhydra.client.client_app import train_mods
from fedhydra.common import settings
from fedhydra.server import server_app

SHAPES = {"base/w": (100, 200), "default-head/b": (16,)}
NODES = (11, 12, 13)
# L2 norm of each node's raw update, in units of the clip norm: one stays inside the ball, two are clipped
UPDATE_NORMS = {11: 0.3, 12: 5.0, 13: 50.0}


def start_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {f"{m}/{k}": rng.normal(0, 0.1, s).astype(np.float32) for m in ("reranker", "adapter")
            for k, s in SHAPES.items()}


def small_models(monkeypatch) -> None:
    """server_app starts from start_arrays() instead of building the encoders."""
    monkeypatch.setattr(server_app.HydraModels, "new", classmethod(lambda cls, cfg: None))
    monkeypatch.setattr(server_app, "shared_arrays",
                        lambda models: {k: torch.from_numpy(v) for k, v in start_arrays().items()})


def values_for(out, **extra) -> dict:
    return settings.resolve({"task": "LaMP_2M", "clients": len(NODES), "test-clients": 0, "rounds": 2,
                             "train-layers": 1, "adapter-margin": "off", "min-nodes": len(NODES), "node-wait": 5.0,
                             "round-timeout": 30.0, "out": str(out)}, extra)


def raw_update(node: int, server_round: int, arrays: dict[str, np.ndarray], clip: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node * 1000 + server_round)
    step = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in arrays.items()}
    norm = float(np.sqrt(sum(float((s.astype(np.float64) ** 2).sum()) for s in step.values())))
    return {k: s * (UPDATE_NORMS[node] * clip / norm) for k, s in step.items()}


def enter_run(monkeypatch) -> None:
    """Messages are made inside a run (the ServerApp process has one): give this test process one."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class NodesGrid(Grid):
    """Just enough of a Grid for a strategy: fixed node ids. Subclasses add the wire (send_and_receive)."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)

    def set_run(self, run):
        pass

    @property
    def run(self):
        return None

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError


class FakeFederation(NodesGrid):
    """Train nodes NODES; `drop` = {round: node that never answers that round's train messages}."""

    def __init__(self, values: dict, drop: dict[int, int] | None = None):
        super().__init__(NODES)
        self.values, self.drop = values, drop or {}
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config=dict(values))
                         for n in NODES}
        self.sent: list[tuple[str, int, int]] = []  # (message type, node, round or 0)
        self.replies: list[dict] = []  # every train reply as it leaves the node (after all mods)
        self.inner: list[dict] = []  # Message-API train message and clipped reply, before SecAgg+ masks it
        self.raw: list[dict] = []  # what the stand-in trainer returned, before any mod
        self.app = ClientApp()
        self.app.query("describe")(self._describe)
        self.app.query("install")(lambda msg, ctx: Message(RecordDict({"metrics": MetricRecord({"arrays": 1})}),
                                                           reply_to=msg))
        self.app.train(mods=train_mods([self._record_inner]))(self._train)

    # ---- the client side
    @staticmethod
    def _describe(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"train-users": 1, "test-users": 0}),
                                   "config": ConfigRecord({"task": "LaMP_2M"})}), reply_to=msg)

    def _train(self, msg: Message, context: Context) -> Message:
        arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        config = msg.content["config"]
        step = raw_update(context.node_id, int(config["round"]), arrays, float(self.values["dp-clip"]))
        new = {k: v + step[k] for k, v in arrays.items()}
        self.raw.append({"node": context.node_id, "round": int(config["round"]), "update": step})
        metrics = {"num-examples": 17, "users": 1, "loss": 0.6931, "accuracy": 0.5, "llm-calls": 4, "tokens": 321,
                   "cache-hits": 0, "seconds": 0.01}
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in new.items()}),
                                   "metrics": MetricRecord(metrics)}), reply_to=msg)

    def _record_inner(self, msg: Message, context: Context, call_next) -> Message:
        sent = {k: a.numpy().copy() for k, a in msg.content["arrays"].items()}
        reply = call_next(msg, context)
        self.inner.append({"node": context.node_id, "round": int(msg.content["config"]["round"]), "sent": sent,
                           "returned": {k: a.numpy().copy() for k, a in reply.content["arrays"].items()}})
        return reply

    # ---- the wire
    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            m = copy.deepcopy(m)  # each node gets its own copy, as after serialization
            node, kind = m.metadata.dst_node_id, m.metadata.message_type
            configs = [r for r in m.content.config_records.values() if "round" in r]
            rnd = int(configs[0]["round"]) if configs else 0
            self.sent.append((kind, node, rnd))
            if kind == "train" and self.drop.get(rnd) == node:
                continue
            sent = ({k: a.numpy().copy() for k, a in m.content["arrays"].items()}
                    if "arrays" in m.content.array_records else None)
            reply = self.app(m, self.contexts[node])
            if kind == "train":
                self.replies.append({"node": node, "round": rnd, "sent": sent, "content": reply.content})
            out.append(reply)
        return out

    # ---- what the tests read
    def train_rounds_sent(self) -> list[int]:
        return sorted({rnd for kind, _, rnd in self.sent if kind == "train" and rnd})


def norm(arrays: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float((np.asarray(v, dtype=np.float64) ** 2).sum()) for v in arrays.values())))
