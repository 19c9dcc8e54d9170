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
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedhydra.client.client_app import train_mods
from fedhydra.common import protocol as p
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
        p.DESCRIBE.register(self.app, self._describe)
        p.INSTALL.register(self.app, lambda msg, ctx: p.install_reply(msg, len(p.arrays_of(msg))))
        p.TRAIN.register(self.app, self._train, mods=train_mods([self._record_inner]))

    # ---- the client side
    @staticmethod
    def _describe(msg: Message, context: Context) -> Message:
        return p.describe_reply(msg, 1, 0, "LaMP_2M")

    def _train(self, msg: Message, context: Context) -> Message:
        request = p.TrainRequest.unpack(msg, int(self.values["rounds"]))
        step = raw_update(context.node_id, request.server_round, request.arrays, float(self.values["dp-clip"]))
        new = {k: v + step[k] for k, v in request.arrays.items()}
        self.raw.append({"node": context.node_id, "round": request.server_round, "update": step})
        metrics = {p.NUM_EXAMPLES: 17, p.USERS: 1, p.LOSS: 0.6931, p.ACCURACY: 0.5, p.LLM_CALLS: 4, p.TOKENS: 321,
                   p.CACHE_HITS: 0, p.SECONDS: 0.01}
        return p.reply(msg, metrics, new)

    def _record_inner(self, msg: Message, context: Context, call_next) -> Message:
        request = p.TrainRequest.unpack(msg, int(self.values["rounds"]))
        reply = call_next(msg, context)
        self.inner.append({"node": context.node_id, "round": request.server_round,
                           "sent": {k: a.copy() for k, a in request.arrays.items()},
                           "returned": {k: a.copy() for k, a in p.arrays_of(reply).items()}})
        return reply

    # ---- the wire
    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            m = copy.deepcopy(m)  # each node gets its own copy, as after serialization
            node, kind = m.metadata.dst_node_id, m.metadata.message_type
            rnd = self.run_round(m)
            self.sent.append((kind, node, rnd))
            if kind == p.TRAIN.message_type and self.drop.get(rnd) == node:
                continue
            sent = ({k: a.copy() for k, a in p.arrays_of(m).items()} if p.ARRAYS in m.content.array_records else None)
            reply = self.app(m, self.contexts[node])
            if kind == p.TRAIN.message_type:
                self.replies.append({"node": node, "round": rnd, "sent": sent, "content": reply.content})
            out.append(reply)
        return out

    def run_round(self, m: Message) -> int:
        """The run's round of a train message (plain, or SecAgg+'s legacy fit message); 0 for other messages."""
        configs = [r for r in m.content.config_records.values() if p.SERVER_ROUND in r and p.MODULE in r]
        if not configs:
            return 0
        return p.run_round(str(configs[0][p.MODULE]), int(configs[0][p.SERVER_ROUND]), int(self.values["rounds"]))

    # ---- what the tests read
    def train_rounds_sent(self) -> list[int]:
        return sorted({rnd for kind, _, rnd in self.sent if kind == p.TRAIN.message_type and rnd})


def norm(arrays: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float((np.asarray(v, dtype=np.float64) ** 2).sum()) for v in arrays.values())))
