"""The Flower ServerApp: FedAvg over the shared bases, then fit-and-evaluate on unseen-user clients.

1. Ask every node which users it holds (train users, unseen test users).
2. Train stage: rounds 1..R train the reranker, R+1..2R the adapter. Each round sends the shared
   arrays of both modules to the (sampled) train clients and averages the returned module's
   arrays weighted by their number of examples. A checkpoint is written after every round.
3. Fit-and-evaluate: the final shared arrays go to the test clients, which fit their users'
   heads locally and return additive metric statistics; summed, they give the task's metrics
   over all test users (not a mean of client means).
Everything lands in OUT/federated.json (per-round metrics, bytes per client per round).
"""

from __future__ import annotations

import json
import random
import time
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedhydra.common.files import write_atomic
from fedhydra.common.hydra import HydraModels, shared_arrays
from fedhydra.common.metrics import metrics_from_stats
from fedhydra.common.tasks import get_task

from . import checkpoint
from .settings import FedSettings


def _log(text: str) -> None:
    log(INFO, "[fedhydra] %s", text)  # Flower's logger: shown by the simulation and deployment runtimes alike


def _nbytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


def _config(settings: FedSettings, **extra) -> ConfigRecord:
    return ConfigRecord({"hydra-config": json.dumps(settings.hydra.as_dict()), "llm": settings.llm,
                         "llm-base-url": settings.llm_base_url, "llm-model": settings.llm_model, **extra})


def _replies(grid: Grid, messages: list[Message], timeout: float, what: str) -> list[Message]:
    """The successful replies; failed or silent nodes are reported and left out of this round."""
    replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
    ok = [r for r in replies if not r.has_error()]
    for r in replies:
        if r.has_error():
            _log(f"{what}: node {r.metadata.src_node_id} failed: {r.error.reason}")
    if len(replies) < len(messages):
        _log(f"{what}: {len(messages) - len(replies)} node(s) did not answer within {timeout:.0f} s")
    return ok


def discover(grid: Grid, settings: FedSettings) -> dict[int, dict]:
    """node id -> {"train-users", "test-users"} for every connected node (waits for min-nodes)."""
    deadline = time.monotonic() + settings.node_wait
    nodes = list(grid.get_node_ids())
    while len(nodes) < settings.min_nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of min-nodes={settings.min_nodes} nodes connected "
                               f"within {settings.node_wait:.0f} s")
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    asks = [Message(RecordDict({"config": ConfigRecord({"action": "describe"})}), dst_node_id=n,
                    message_type=MessageType.QUERY) for n in nodes]
    roles = {}
    for r in _replies(grid, asks, settings.round_timeout, "describe"):
        m, task = r.content["metrics"], str(r.content["config"]["task"])
        if settings.task and task != settings.task:
            raise RuntimeError(f"node {r.metadata.src_node_id} holds {task} users, but the run is for {settings.task}")
        roles[r.metadata.src_node_id] = {"train-users": int(m["train-users"]), "test-users": int(m["test-users"]),
                                         "task": task}
    if len({r["task"] for r in roles.values()}) > 1:
        raise RuntimeError(f"the nodes hold different tasks: {sorted({r['task'] for r in roles.values()})}")
    return roles


def aggregate(replies: list[Message]) -> dict[str, torch.Tensor]:
    """FedAvg: the mean of the clients' arrays weighted by their number of training examples."""
    weights = [float(r.content["metrics"]["num-examples"]) for r in replies]
    total = sum(weights)
    if total <= 0:
        raise RuntimeError("no client reported training examples this round")
    out: dict[str, torch.Tensor] = {}
    for r, w in zip(replies, weights):
        for k, v in r.content["arrays"].to_torch_state_dict().items():
            v = v.to(torch.float64) * (w / total)
            out[k] = out[k] + v if k in out else v
    return {k: v.to(torch.float32) for k, v in out.items()}


def train_round(grid: Grid, settings: FedSettings, server_round: int, nodes: list[int],
                shared: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    module = settings.module_of(server_round)
    if settings.clients_per_round and settings.clients_per_round < len(nodes):
        nodes = sorted(random.Random(f"{settings.hydra.seed}:{server_round}").sample(nodes, settings.clients_per_round))
    t0 = time.perf_counter()
    arrays = ArrayRecord(shared)
    down = _nbytes(arrays)
    msgs = [Message(RecordDict({"arrays": arrays, "config": _config(settings, module=module, **{
        "server-round": server_round})}), dst_node_id=n, message_type=MessageType.TRAIN,
        group_id=str(server_round)) for n in nodes]
    replies = _replies(grid, msgs, settings.round_timeout, f"round {server_round}")
    if not replies:
        raise RuntimeError(f"round {server_round}: no train client answered")
    updated = aggregate(replies)
    merged = {**shared, **updated}
    n = sum(float(r.content["metrics"]["num-examples"]) for r in replies)
    mean = lambda key: sum(float(r.content["metrics"][key]) * float(r.content["metrics"]["num-examples"])  # noqa: E731
                           for r in replies) / n
    record = {"round": server_round, "module": module, "clients": len(replies), "sent_to": len(nodes),
              "examples": int(n), "loss": mean("loss"), "accuracy": mean("accuracy"),
              "llm_calls": int(sum(float(r.content["metrics"]["llm-calls"]) for r in replies)),
              "tokens": int(sum(float(r.content["metrics"]["tokens"]) for r in replies)),
              "cache_hits": int(sum(float(r.content["metrics"]["cache-hits"]) for r in replies)),
              "seconds": round(time.perf_counter() - t0, 2),
              "bytes": {str(r.metadata.src_node_id): {"down": down, "up": _nbytes(r.content["arrays"])}
                        for r in replies}}
    return merged, record


def fit_and_evaluate(grid: Grid, settings: FedSettings, nodes: list[int], shared: dict[str, torch.Tensor],
                     task_name: str) -> dict:
    t0 = time.perf_counter()
    arrays = ArrayRecord(shared)
    msgs = [Message(RecordDict({"arrays": arrays, "config": _config(settings)}), dst_node_id=n,
                    message_type=MessageType.EVALUATE) for n in nodes]
    replies = _replies(grid, msgs, settings.round_timeout, "fit-and-evaluate")
    if not replies:
        raise RuntimeError("fit-and-evaluate: no test client answered")
    stats: dict[str, float] = {}
    for r in replies:
        for k, v in r.content["metrics"].items():
            if k.startswith("stat:"):
                stats[k[5:]] = stats.get(k[5:], 0.0) + float(v)
    total = lambda key: int(sum(float(r.content["metrics"][key]) for r in replies))  # noqa: E731
    return {"metrics": metrics_from_stats(get_task(task_name), stats), "users": total("users"),
            "clients": len(replies), "sent_to": len(nodes), "llm_calls": total("llm-calls"),
            "tokens": total("tokens"), "cache_hits": total("cache-hits"), "seconds": round(time.perf_counter() - t0, 2),
            "bytes_down_per_client": _nbytes(arrays)}


def run(grid: Grid, settings: FedSettings) -> dict:
    """The whole federated job; returns (and writes) what OUT/federated.json holds."""
    out = Path(settings.out)
    roles = discover(grid, settings)
    if not roles:
        raise RuntimeError("no node answered the describe query")
    task_name = settings.task or next(iter(roles.values()))["task"]
    train_nodes = sorted(n for n, r in roles.items() if r["train-users"])
    test_nodes = sorted(n for n, r in roles.items() if r["test-users"])
    _log(f"{len(roles)} nodes: {len(train_nodes)} train clients, {len(test_nodes)} test clients")
    if not train_nodes:
        raise RuntimeError("no connected node holds training users")
    start, history = 0, []
    restored = checkpoint.load(out / "checkpoint", settings.fingerprint()) if settings.resume else None
    if restored:
        start, shared, history = restored
        _log(f"resuming after round {start} of {settings.total_rounds()}")
    else:
        shared = shared_arrays(HydraModels.new(settings.hydra))  # seeded: every run starts identically
    doc = {"task": task_name, "settings": {"rounds per module": settings.rounds, "local epochs": settings.local_epochs,
                                          "clients per round": settings.clients_per_round or len(train_nodes)},
           "config": settings.hydra.as_dict(), "nodes": {"train": len(train_nodes), "test": len(test_nodes)},
           "rounds": history, "status": "running"}
    for server_round in range(start + 1, settings.total_rounds() + 1):
        shared, record = train_round(grid, settings, server_round, train_nodes, shared)
        history.append(record)
        checkpoint.save(out / "checkpoint", server_round, shared, settings.fingerprint(), history)
        up = max(b["up"] for b in record["bytes"].values())
        _log(f"round {server_round}/{settings.total_rounds()} ({record['module']}): {record['clients']} clients, "
             f"loss {record['loss']:.4f}, {record['seconds']:.1f} s, up {up / 1e6:.1f} MB/client")
        if settings.stop_after_round and server_round == settings.stop_after_round < settings.total_rounds():
            doc["status"] = f"stopped after round {server_round}"
            write_atomic(out / "federated.json", json.dumps(doc, indent=1) + "\n")
            _log(doc["status"] + "; continue with resume=true")
            return doc
    if test_nodes:
        doc["evaluation"] = fit_and_evaluate(grid, settings, test_nodes, shared, task_name)
        _log(f"fit-and-evaluate on {doc['evaluation']['users']} unseen users: {doc['evaluation']['metrics']}")
    doc["status"] = "done"
    write_atomic(out / "federated.json", json.dumps(doc, indent=1) + "\n")
    return doc


def make_server_app(defaults: dict | None = None) -> ServerApp:
    """A ServerApp whose run config falls back to `defaults` (the simulation harness passes them)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = FedSettings.from_config(context.run_config, defaults)
        run(grid, settings)

    return app


# The app `flwr run` loads (pyproject: [tool.flwr.app.components]).
app = make_server_app()
