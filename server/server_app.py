"""The Flower ServerApp: Flower's strategies train the shared bases, then unseen users' clients fit and answer.

1. Ask every node what it holds (query.describe): train users, unseen test users, the task.
2. Train stage, one Flower strategy per module (server/strategy.py): rounds 1..R train the reranker,
   R+1..2R the adapter. A train message carries exactly the module it trains, and the reply returns
   the same arrays, so Flower's mods and DP wrappers apply. Before the adapter rounds the final
   reranker is installed on the train clients (query.install): the adapter's labels come from prompts
   built with it. A checkpoint (arrays + strategy state) is written after every round.
3. Calibration (adapter-margin auto): train clients score held-out training queries with the final
   adapter and return additive sums per margin; the server picks the margin (evaluate.calibrate).
4. Fit-and-evaluate: the final bases go to the test clients, which fit their users' heads locally and
   return additive metric statistics; summed, they give the task's metrics over all test users.
Everything lands in OUT/federated.json (per-round metrics, bytes per client per round).
"""

from __future__ import annotations

import json
import random
import time
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedhydra.common import settings
from fedhydra.common.config import MARGIN_AUTO, MARGIN_OFF, HydraConfig
from fedhydra.common.files import write_atomic
from fedhydra.common.hydra import MODULES, HydraModels, digest, shared_arrays
from fedhydra.common.metrics import metrics_from_stats
from fedhydra.common.selection import pick_margin
from fedhydra.common.tasks import get_task

from . import checkpoint
from .strategy import NodeSubset, load_state_arrays, make_strategy, state_arrays


def _log(text: str) -> None:
    log(INFO, "[fedhydra] %s", text)  # Flower's logger: shown by the simulation and deployment runtimes alike


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def _nbytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


def of_module(arrays: dict[str, np.ndarray], module: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in arrays.items() if k.startswith(module + "/")}


def _exchange(grid: Grid, messages: list[Message], timeout: float, what: str) -> list[Message]:
    """Send, wait, and keep the successful replies; failed or silent nodes are reported and left out."""
    replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
    for r in replies:
        if r.has_error():
            _log(f"{what}: node {r.metadata.src_node_id} failed: {r.error.reason}")
    if len(replies) < len(messages):
        _log(f"{what}: {len(messages) - len(replies)} node(s) did not answer within {timeout:.0f} s")
    return [r for r in replies if not r.has_error()]


def _send(grid: Grid, nodes: list[int], message_type: str, content: dict, values: dict, what: str) -> list[Message]:
    msgs = [Message(RecordDict(content), dst_node_id=n, message_type=message_type) for n in nodes]
    return _exchange(grid, msgs, float(values["round-timeout"]), what)


def discover(grid: Grid, values: dict) -> dict[int, dict]:
    """node id -> {"train-users", "test-users", "task"} for every connected node (waits for min-nodes)."""
    deadline = time.monotonic() + float(values["node-wait"])
    while len(nodes := list(grid.get_node_ids())) < int(values["min-nodes"]):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of min-nodes={values['min-nodes']} nodes connected "
                               f"within {values['node-wait']:.0f} s")
        time.sleep(1.0)
    roles = {}
    for r in _send(grid, nodes, "query.describe", {"config": ConfigRecord({})}, values, "describe"):
        m, task = r.content["metrics"], str(r.content["config"]["task"])
        if values["task"] and task != values["task"]:
            raise RuntimeError(f"node {r.metadata.src_node_id} holds {task} users, but the run is for {values['task']}")
        roles[r.metadata.src_node_id] = {"train-users": int(m["train-users"]), "test-users": int(m["test-users"]),
                                         "task": task}
    if len({r["task"] for r in roles.values()}) > 1:
        raise RuntimeError(f"the nodes hold different tasks: {sorted({r['task'] for r in roles.values()})}")
    return roles


def train_round(grid: Grid, values: dict, strategy, server_round: int, phase_round: int, module: str,
                nodes: list[int], arrays: dict[str, np.ndarray], reranker_digest: str) -> tuple[dict, dict]:
    """One round of `module` run by the strategy; returns (the module's new arrays, the round's record)."""
    t0 = time.perf_counter()
    record = _record(arrays)
    config = ConfigRecord({"module": module, "round": server_round, "reranker-digest": reranker_digest})
    random.seed(f"{values['seed']}:{server_round}")  # Flower samples with `random`: a resumed run samples alike
    messages = list(strategy.configure_train(phase_round, record, config, NodeSubset(grid, nodes)))
    replies = _exchange(grid, messages, float(values["round-timeout"]), f"round {server_round}")
    new, _ = strategy.aggregate_train(phase_round, replies)
    if new is None:
        raise RuntimeError(f"round {server_round}: no train client answered")
    metrics = [r.content["metrics"] for r in replies]
    for r, m in zip(replies, metrics):  # record-level DP (client/privacy.py): a spent client returns its arrays as sent
        if m.get("dp-exhausted"):
            _log(f"round {server_round}: node {r.metadata.src_node_id} has spent its record-level DP budget "
                 f"(epsilon {float(m['dp-epsilon-spent']):.3f} at delta {float(m['dp-delta']):g}); it did not train")
    n = sum(float(m["num-examples"]) for m in metrics)
    total = lambda key: sum(float(m[key]) for m in metrics)  # noqa: E731
    down = _nbytes(record)
    doc = {"round": server_round, "module": module, "clients": len(replies), "sent_to": len(messages),
           "examples": int(n), "loss": sum(float(m["loss"]) * float(m["num-examples"]) for m in metrics) / n,
           "llm_calls": int(total("llm-calls")), "tokens": int(total("tokens")),
           "cache_hits": int(total("cache-hits")), "seconds": round(time.perf_counter() - t0, 2),
           "bytes": {str(r.metadata.src_node_id): {"down": down, "up": _nbytes(r.content["arrays"])} for r in replies}}
    return _numpy(new), doc


def install(grid: Grid, values: dict, nodes: list[int], arrays: dict[str, np.ndarray], module: str) -> int:
    """Send a module's final arrays to `nodes` to keep (the reranker, before the adapter rounds)."""
    ok = _send(grid, nodes, "query.install", {"arrays": _record(arrays), "config": ConfigRecord({"module": module})},
               values, f"install {module}")
    _log(f"final {module} installed on {len(ok)} of {len(nodes)} train clients")
    return len(ok)


def calibrate(grid: Grid, values: dict, nodes: list[int], adapter: dict[str, np.ndarray]) -> dict:
    """The adapter margin chosen from the train clients' additive sums over held-out training queries."""
    replies = _send(grid, nodes, "evaluate.calibrate", {"arrays": _record(adapter), "config": ConfigRecord({})},
                    values, "calibrate")
    sums: dict[str, float] = {}
    for r in replies:
        for k, v in r.content["metrics"].items():
            sums[k] = sums.get(k, 0.0) + float(v)
    choice = pick_margin(sums)
    _log(f"adapter margin {choice['margin']} from {choice['queries']} held-out queries on {len(replies)} clients")
    return choice


def fit_and_evaluate(grid: Grid, values: dict, nodes: list[int], shared: dict[str, np.ndarray], margin: float,
                     task_name: str) -> dict:
    t0 = time.perf_counter()
    record = _record(shared)
    replies = _send(grid, nodes, "evaluate", {"arrays": record, "config": ConfigRecord({"margin": margin})},
                    values, "fit-and-evaluate")
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
            "bytes_down_per_client": _nbytes(record)}


def run(grid: Grid, values: dict) -> dict:
    """The whole federated job; returns (and writes) what OUT/federated.json holds."""
    out, cfg = Path(values["out"]), HydraConfig.from_settings(values)
    rounds = int(values["rounds"])
    roles = discover(grid, values)
    if not roles:
        raise RuntimeError("no node answered the describe query")
    task_name = values["task"] or next(iter(roles.values()))["task"]
    train_nodes = sorted(n for n, r in roles.items() if r["train-users"])
    test_nodes = sorted(n for n, r in roles.items() if r["test-users"])
    _log(f"{len(roles)} nodes: {len(train_nodes)} train clients, {len(test_nodes)} test clients; "
         f"strategy {values['strategy']}, {rounds} rounds per module")
    if not train_nodes:
        raise RuntimeError("no connected node holds training users")
    fp = checkpoint.fingerprint(values)
    start, history, state = 0, [], {}
    restored = checkpoint.load(out / "checkpoint", fp) if values["resume"] else None
    if restored:
        start, shared, state, history = restored
        _log(f"resuming after round {start} of {2 * rounds}")
    else:  # seeded: every run starts from the same weights
        shared = {k: v.numpy() for k, v in shared_arrays(HydraModels.new(cfg)).items()}
    doc = {"task": task_name, "settings": values, "config": cfg.as_dict(),
           "nodes": {"train": len(train_nodes), "test": len(test_nodes)}, "rounds": history, "status": "running"}
    for i, module in enumerate(MODULES):
        first, last = i * rounds + 1, (i + 1) * rounds
        if start >= last:
            continue
        strategy = make_strategy(values)
        if state and start >= first:  # resuming inside this module's rounds
            load_state_arrays(strategy, state)
        reranker_digest = digest(of_module(shared, "reranker")) if module == "adapter" else ""
        if module == "adapter":
            install(grid, values, train_nodes, of_module(shared, "reranker"), "reranker")
        for server_round in range(max(start + 1, first), last + 1):
            arrays, record = train_round(grid, values, strategy, server_round, server_round - first + 1, module,
                                         train_nodes, of_module(shared, module), reranker_digest)
            shared |= arrays
            history.append(record)
            checkpoint.save(out / "checkpoint", server_round, shared, fp, history, state_arrays(strategy))
            up = max(b["up"] for b in record["bytes"].values())
            _log(f"round {server_round}/{2 * rounds} ({module}): {record['clients']} clients, loss "
                 f"{record['loss']:.4f}, {record['seconds']:.1f} s, up {up / 1e6:.1f} MB/client")
            if values["stop-after-round"] and server_round == values["stop-after-round"] < 2 * rounds:
                doc["status"] = f"stopped after round {server_round}"
                write_atomic(out / "federated.json", json.dumps(doc, indent=1) + "\n")
                _log(doc["status"] + "; continue with resume=true")
                return doc
    margin = cfg.margin
    if margin == MARGIN_AUTO:
        doc["calibration"] = calibrate(grid, values, train_nodes, of_module(shared, "adapter"))
        margin = doc["calibration"]["margin"]
    doc["margin"] = margin
    if test_nodes:
        sent = -1.0 if margin == MARGIN_OFF else float(margin)
        doc["evaluation"] = fit_and_evaluate(grid, values, test_nodes, shared, sent, task_name)
        _log(f"fit-and-evaluate on {doc['evaluation']['users']} unseen users: {doc['evaluation']['metrics']}")
    doc["status"] = "done"
    write_atomic(out / "federated.json", json.dumps(doc, indent=1) + "\n")
    return doc


app = ServerApp()  # `flwr run` loads it (pyproject: [tool.flwr.app.components])


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(grid, settings.resolve(context.run_config))
