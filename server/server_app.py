"""The Flower ServerApp: Flower's strategies train the shared bases, then unseen users' clients fit and answer.
Every message is packed and read with common/protocol.py (its kinds, keys and round numbers).

1. Ask every node what it holds (DESCRIBE): train users, unseen test users, the task.
2. Train stage, one Flower strategy per module (server/strategy.py): rounds 1..R train the reranker,
   R+1..2R the adapter. A train message carries exactly the module it trains, and the reply returns
   the same arrays, so Flower's mods and DP wrappers apply. Before the adapter rounds the final
   reranker is installed on the train clients (INSTALL): the adapter's labels come from prompts
   built with it. A checkpoint (arrays + strategy state) is written after every round.
   Privacy (PRIVACY.md): dp=user wraps the FedAvg in Flower's accounted central-DP wrapper
   (server/central_dp.py) and keeps the privacy ledger in the checkpoint; a round that would pass
   dp-max-epsilon is not sent and the run ends with that status; secagg=true runs each train round
   through Flower's SecAgg+ workflow (server/secagg.py). Every such run states its guarantee in
   federated.json's "privacy" section (server/privacy_statement.py).
3. Calibration (adapter-margin auto): train clients score held-out training queries with the final
   adapter and return additive sums per margin; the server picks the margin (CALIBRATE).
4. Fit-and-evaluate (EVALUATE): the final bases go to the test clients, which fit their users' heads locally and
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
from flwr.app import ArrayRecord, Context, Message
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted

from fedhydra.common import protocol as p
from fedhydra.common import settings
from fedhydra.common.config import MARGIN_AUTO, MARGIN_OFF, HydraConfig
from fedhydra.common.files import write_atomic
from fedhydra.common.hydra import HydraModels, digest, shared_arrays
from fedhydra.common.metrics import metrics_from_stats
from fedhydra.common.selection import pick_margin
from fedhydra.common.tasks import get_task

from . import checkpoint, secagg
from .central_dp import UserLevelDP
from .privacy_statement import statement
from .strategy import FixedNodes, NodeSubset, load_state_arrays, make_strategy, state_arrays


def _log(text: str) -> None:
    log(INFO, "[fedhydra] %s", text)  # Flower's logger: shown by the simulation and deployment runtimes alike


def _nbytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


def _exchange(grid: Grid, messages: list[Message], timeout: float, what: str) -> list[Message]:
    """Send, wait, and keep the successful replies; failed or silent nodes are reported and left out."""
    replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
    for r in replies:
        if r.has_error():
            _log(f"{what}: node {r.metadata.src_node_id} failed: {r.error.reason}")
    if len(replies) < len(messages):
        _log(f"{what}: {len(messages) - len(replies)} node(s) did not answer within {timeout:.0f} s")
    return [r for r in replies if not r.has_error()]


def _send(grid: Grid, messages: list[Message], values: dict, what: str) -> list[Message]:
    return _exchange(grid, messages, float(values["round-timeout"]), what)


def wait_for_nodes(grid: Grid, values: dict, known: dict | None = None, must: bool = True) -> list[int]:
    """Wait until min-nodes nodes are connected, saying how many and which are there and which known ones are not;
    after node-wait seconds, an error before the first round (`must`), else go on with those connected."""
    want, wait = int(values["min-nodes"]), float(values["node-wait"])
    deadline, last, said = time.monotonic() + wait, None, 0.0
    while len(nodes := sorted(grid.get_node_ids())) < want:
        missing = sorted(set(known or ()) - set(nodes))
        text = (f"waiting for nodes: {len(nodes)} of min-nodes={want} connected {nodes}"
                + (f"; not connected: {missing}" if missing else ""))
        if text != last or time.monotonic() - said > 30:
            _log(text)
            last, said = text, time.monotonic()
        if time.monotonic() > deadline:
            if must:
                raise RuntimeError(f"only {len(nodes)} of min-nodes={want} nodes connected within {wait:.0f} s")
            _log(f"{len(nodes)} of min-nodes={want} nodes after {wait:.0f} s; going on with them")
            return nodes
        time.sleep(1.0)
    return nodes


def describe(grid: Grid, values: dict, nodes: list[int]) -> dict[int, p.Description]:
    """node id -> what it holds (train users, test users, task) for `nodes` (those that answer)."""
    roles = {}
    for r in _send(grid, [p.describe_request(n) for n in nodes], values, p.DESCRIBE.message_type):
        node = roles[r.metadata.src_node_id] = p.Description.unpack(r)
        if values["task"] and node.task != values["task"]:
            raise RuntimeError(f"node {r.metadata.src_node_id} holds {node.task} users, but the run is for "
                               f"{values['task']}")
    return roles


def discover(grid: Grid, values: dict) -> dict[int, p.Description]:
    """node id -> what it holds for every connected node (waits for min-nodes)."""
    roles = describe(grid, values, wait_for_nodes(grid, values))
    if len({r.task for r in roles.values()}) > 1:
        raise RuntimeError(f"the nodes hold different tasks: {sorted({r.task for r in roles.values()})}")
    return roles


def late_joiners(grid: Grid, values: dict, roles: dict[int, p.Description], task_name: str,
                 room: int | None) -> list[int]:
    """Nodes connected since the last look (described, added to `roles`); returns the new train nodes, at most
    `room` of them (dp=user: the accountant's population). A node of another task is left out, with a log line."""
    new = sorted(set(grid.get_node_ids()) - set(roles))
    if not new:
        return []
    joined = []
    for node, role in describe(grid, values, new).items():
        if role.task != task_name:
            _log(f"node {node} joined with {role.task} users; this run is for {task_name}: left out")
            continue
        if role.train_users and room is not None and len(joined) >= room:
            _log(f"node {node} joined, but dp=user's population is full: left out of training")
            continue
        roles[node] = role
        if role.train_users:
            joined.append(node)
    _log(f"late joiners: {new}; train clients among them: {joined}")
    return joined


def _round_doc(server_round: int, module: str, metrics: list, sent_to: int, nbytes: dict, t0: float,
               note: str = "") -> dict:
    """The round's record from its replies' metrics (per-client loss is absent in DP mode: loss None)."""
    n = sum(float(m[p.NUM_EXAMPLES]) for m in metrics)
    total = lambda key: sum(float(m.get(key, 0)) for m in metrics)  # noqa: E731
    loss = (sum(float(m[p.LOSS]) * float(m[p.NUM_EXAMPLES]) for m in metrics) / n
            if metrics and all(p.LOSS in m for m in metrics) else None)
    doc = {"round": server_round, "module": module, "clients": len(metrics), "sent_to": sent_to, "examples": int(n),
           "loss": loss, "llm_calls": int(total(p.LLM_CALLS)), "tokens": int(total(p.TOKENS)),
           "cache_hits": int(total(p.CACHE_HITS)), "seconds": round(time.perf_counter() - t0, 2), "bytes": nbytes}
    record_dp = [m for m in metrics if p.DP_EPSILON in m]
    if record_dp:  # record-level DP: each client's own ledger (client/privacy.py); the round reports the worst
        worst = lambda key: max(float(m.get(key, 0.0)) for m in record_dp)  # noqa: E731
        doc["record_dp"] = {"epsilon": worst(p.DP_EPSILON), "item_epsilon": worst(p.DP_ITEM_EPSILON),
                            "delta": worst(p.DP_DELTA), "noise_multiplier": worst(p.DP_NOISE_MULTIPLIER),
                            "clip": worst(p.DP_CLIP), "max_item_units": int(worst(p.DP_ITEM_UNITS)),
                            "exhausted_clients": int(sum(float(m.get(p.DP_EXHAUSTED, 0)) for m in record_dp))}
    return doc | ({"released": False, "note": note} if note else {})


def train_round(grid: Grid, values: dict, strategy, server_round: int, module: str, nodes: list[int],
                arrays: dict[str, np.ndarray], reranker_digest: str,
                dp: UserLevelDP | None = None) -> tuple[dict, dict]:
    """One round of `module` run by the strategy; returns (the module's new arrays, the round's record).
    `server_round` is the run's round; the strategy gets the module's own (protocol.py: "Round numbers").
    Under dp=user a round that released nothing returns {} (arrays unchanged, no epsilon spent); a round
    that would pass dp-max-epsilon raises PrivacyBudgetExhausted before anything is sent."""
    t0 = time.perf_counter()
    config = p.train_config(module, reranker_digest)
    _, phase_round = p.module_round(server_round, int(values["rounds"]))
    random.seed(f"{values['seed']}:{server_round}")  # Flower samples with `random`: a resumed run samples alike
    if values["secagg"]:  # Flower's legacy fit config: no strategy writes the round, so we do
        r = secagg.train_round(grid, values, server_round, nodes, arrays,
                               {**config, p.SERVER_ROUND: phase_round}, dp)
        if r.arrays is None and not dp:
            raise RuntimeError(f"round {server_round}: {r.note}")
        return r.arrays or {}, _round_doc(server_round, module, list(r.metrics.values()), r.sampled, r.bytes, t0,
                                          r.note)
    record = p.array_record(arrays)
    if dp:  # Flower's accounted wrapper, sized for the clients this round samples (what FedAvg samples)
        live = list(NodeSubset(grid, nodes).get_node_ids())
        if not live:
            raise RuntimeError(f"round {server_round}: no train client is connected")
        sample = max(int(len(live) * strategy.fraction_train), strategy.min_train_nodes)
        dp.check_budget(sample)
        runner, view = dp.wrap(strategy, sample), FixedNodes(grid, live)
    else:
        runner, view = strategy, NodeSubset(grid, nodes)
    messages = list(runner.configure_train(phase_round, record, config, view))
    replies = _exchange(grid, messages, float(values["round-timeout"]), f"round {server_round}")
    if dp:
        new = dp.aggregate(runner, phase_round, replies)
    else:
        new, _ = strategy.aggregate_train(phase_round, replies)
        if new is None:
            raise RuntimeError(f"round {server_round}: no train client answered")
    note = "" if new is not None else (f"skipped: {len(replies)} of {len(messages)} sampled clients answered; "
                                       "nothing released, no epsilon spent")
    metrics = [p.metrics_of(r) for r in replies]
    for r, m in zip(replies, metrics):  # record-level DP (client/privacy.py): a spent client returns its arrays as sent
        if m.get(p.DP_EXHAUSTED):
            _log(f"round {server_round}: node {r.metadata.src_node_id} has spent its record-level DP budget "
                 f"(epsilon {float(m[p.DP_EPSILON]):.3f} at delta {float(m[p.DP_DELTA]):g}); it did not train")
    down = _nbytes(record)
    nbytes = {str(r.metadata.src_node_id): {"down": down, "up": _nbytes(r.content[p.ARRAYS])} for r in replies}
    doc = _round_doc(server_round, module, metrics, len(messages), nbytes, t0, note)
    return ({} if new is None else {k: a.numpy() for k, a in new.items()}), doc


def install(grid: Grid, values: dict, nodes: list[int], arrays: dict[str, np.ndarray], module: str) -> set[int]:
    """Send a module's final arrays to `nodes` to keep (the reranker, before the adapter rounds); the nodes that
    acknowledged."""
    ok = _send(grid, [p.install_request(n, module, arrays) for n in nodes], values, f"install {module}")
    _log(f"final {module} installed on {len(ok)} of {len(nodes)} train clients")
    return {r.metadata.src_node_id for r in ok}


def install_listed(grid: Grid, values: dict, nodes: list[int], reranker: dict[str, np.ndarray]) -> set[int]:
    """Install the final reranker on `nodes`, retrying those that failed while the SuperLink still lists them (a
    restarted device reconnecting under its id) for up to node-wait seconds; the nodes that hold it."""
    done, deadline = set(), time.monotonic() + float(values["node-wait"])
    while True:
        done |= install(grid, values, [n for n in nodes if n not in done], reranker, p.RERANKER)
        listed = set(grid.get_node_ids())
        if not [n for n in nodes if n not in done and n in listed] or time.monotonic() > deadline:
            return done
        time.sleep(5.0)


def calibrate(grid: Grid, values: dict, nodes: list[int], adapter: dict[str, np.ndarray]) -> dict:
    """The adapter margin chosen from the train clients' additive sums over held-out training queries."""
    replies = _send(grid, [p.calibrate_request(n, adapter) for n in nodes], values, p.CALIBRATE.message_type)
    choice = pick_margin(p.summed(replies))
    _log(f"adapter margin {choice['margin']} from {choice['queries']} held-out queries on {len(replies)} clients")
    return choice


def fit_and_evaluate(grid: Grid, values: dict, nodes: list[int], shared: dict[str, np.ndarray],
                     margin: float | None, task_name: str) -> dict:
    """The test clients fit their users' heads and answer with `margin` (None: greedy); their summed statistics."""
    t0 = time.perf_counter()
    messages = [p.evaluate_request(n, shared, margin) for n in nodes]
    replies = _send(grid, messages, values, "fit-and-evaluate")
    if not replies:
        raise RuntimeError("fit-and-evaluate: no test client answered")
    total = p.summed(replies)
    return {"metrics": metrics_from_stats(get_task(task_name), p.summed(replies, p.STAT)),
            "users": int(total[p.USERS]), "clients": len(replies), "sent_to": len(nodes),
            "llm_calls": int(total[p.LLM_CALLS]), "tokens": int(total[p.TOKENS]),
            "cache_hits": int(total[p.CACHE_HITS]), "seconds": round(time.perf_counter() - t0, 2),
            "bytes_down_per_client": _nbytes(messages[0].content[p.ARRAYS]) if messages else 0}


def privacy_setup(values: dict, train_nodes: list[int]) -> UserLevelDP | None:
    """dp=user's parameters and ledger (None otherwise), after refusing what cannot run privately."""
    private = values["dp"] == "user" or values["secagg"]
    if private and values["strategy"] != "fedavg":
        raise ValueError(f"dp=user and secagg need strategy fedavg, got {values['strategy']!r}: the clipped "
                         "updates are averaged with equal weights, as the noise and SecAgg+'s mean assume")
    if values["secagg"]:
        secagg.sample_size(len(train_nodes), float(values["fraction-train"]))  # refuses fewer than 2
    dp = UserLevelDP.from_settings(values)
    if dp and len(train_nodes) > dp.population:
        raise ValueError(f"dp=user: {len(train_nodes)} train clients connected but the clients setting (the "
                         f"accountant's population) is {dp.population}; set clients={len(train_nodes)}")
    return dp


def run(grid: Grid, values: dict) -> dict:
    """The whole federated job; returns (and writes) what OUT/federated.json holds."""
    out, cfg = Path(values["out"]), HydraConfig.from_settings(values)
    rounds = int(values["rounds"])
    total_rounds = len(p.MODULES) * rounds
    roles = discover(grid, values)
    if not roles:
        raise RuntimeError("no node answered the describe query")
    task_name = values["task"] or next(iter(roles.values())).task
    train_nodes = sorted(n for n, r in roles.items() if r.train_users)
    test_nodes = sorted(n for n, r in roles.items() if r.test_users)
    _log(f"{len(roles)} nodes: {len(train_nodes)} train clients, {len(test_nodes)} test clients; "
         f"strategy {values['strategy']}, {rounds} rounds per module")
    if not train_nodes:
        raise RuntimeError("no connected node holds training users")
    dp = privacy_setup(values, train_nodes)
    fp = checkpoint.fingerprint(values)
    start, history, state = 0, [], {}
    restored = checkpoint.load(out / "checkpoint", fp) if values["resume"] else None
    if restored:
        start, shared, state, history = restored
        if dp:  # the same ledger goes on: epsilon keeps accumulating across the restart
            ledger = checkpoint.load_privacy(out / "checkpoint")
            if ledger is None:
                raise ValueError(f"the checkpoint in {out / 'checkpoint'} holds no privacy ledger to continue")
            dp.load_state_dict(ledger)
        _log(f"resuming after round {start} of {total_rounds}")
    else:  # seeded: every run starts from the same weights
        shared = {k: v.numpy() for k, v in shared_arrays(HydraModels.new(cfg)).items()}
    if dp:
        _log(f"dp=user: noise multiplier {dp.noise_multiplier:.4g} ({dp.source}), clip {dp.clip}, delta {dp.delta}, "
             f"max epsilon {dp.max_epsilon}; spent so far {dp.epsilon:.4f} in {dp.releases} releases")
    private = values["dp"] != "off" or values["secagg"]
    doc = {"task": task_name, "data set": values.get("data-name") or task_name, "settings": values, "config": cfg.as_dict(),
           "nodes": {"train": len(train_nodes), "test": len(test_nodes)}, "rounds": history, "status": "running"}

    def finish(status: str, stopped: str = "") -> dict:
        doc["status"] = status
        if private:
            doc["privacy"] = statement(values, dp, history, stopped)
        write_atomic(out / "federated.json", json.dumps(doc, indent=1) + "\n")
        return doc

    for module in p.MODULES:
        first, last = p.run_round(module, 1, rounds), p.run_round(module, rounds, rounds)
        if start >= last:
            continue
        strategy = make_strategy(values)
        if state and start >= first:  # resuming inside this module's rounds
            load_state_arrays(strategy, state)
        reranker_digest = digest(p.of_module(shared, p.RERANKER)) if module == p.ADAPTER else ""
        installed: set[int] = set()  # train nodes that hold the final reranker (the adapter's labels need it)
        for server_round in range(max(start + 1, first), last + 1):
            # A real fleet: a device that dropped may come back, a new one may join. Each round waits (up to
            # node-wait) for min-nodes, then takes in the nodes that connected since, from this round on.
            wait_for_nodes(grid, values, roles, must=False)
            room = None if not dp else max(0, dp.population - len(train_nodes))
            train_nodes += late_joiners(grid, values, roles, task_name, room)
            if module == p.ADAPTER and (missing := [n for n in train_nodes if n not in installed]):
                # its labels come from prompts built with the final reranker: sent before the first adapter round,
                # and again to a node that missed it (down then, back now) or joined since
                installed |= install_listed(grid, values, missing, p.of_module(shared, p.RERANKER))
            try:
                arrays, record = train_round(grid, values, strategy, server_round, module, train_nodes,
                                             p.of_module(shared, module), reranker_digest, dp)
            except PrivacyBudgetExhausted as exc:  # nothing of this round was sent
                _log(f"round {server_round} not run: {exc}")
                return finish("privacy budget exhausted", f"before round {server_round}: {exc}")
            shared |= arrays
            if dp:
                record["epsilon"] = dp.epsilon
            history.append(record)
            checkpoint.save(out / "checkpoint", server_round, shared, fp, history, state_arrays(strategy),
                            dp.state_dict() if dp else None)
            up = max((b["up"] for b in record["bytes"].values()), default=0)
            loss = "-" if record["loss"] is None else f"{record['loss']:.4f}"
            _log(f"round {server_round}/{total_rounds} ({module}): {record['clients']} clients, loss {loss}, "
                 f"{record['seconds']:.1f} s, up {up / 1e6:.1f} MB/client"
                 + (f", epsilon {dp.epsilon:.4f}" if dp else "")
                 + (f", worst client's epsilon {record['record_dp']['epsilon']:.4f} (item "
                    f"{record['record_dp']['item_epsilon']:.1f})" if "record_dp" in record else "")
                 + (f"; {record['note']}" if "note" in record else ""))
            if values["stop-after-round"] and server_round == values["stop-after-round"] < total_rounds:
                _log(f"stopped after round {server_round}; continue with resume=true")
                return finish(f"stopped after round {server_round}")
    late_joiners(grid, values, roles, task_name, None)  # test clients that joined during training are evaluated too
    test_nodes = sorted(n for n, r in roles.items() if r.test_users)
    margin = cfg.margin
    if margin == MARGIN_AUTO:
        doc["calibration"] = calibrate(grid, values, train_nodes, p.of_module(shared, p.ADAPTER))
        margin = doc["calibration"]["margin"]
    doc["margin"] = margin
    if test_nodes:
        doc["evaluation"] = fit_and_evaluate(grid, values, test_nodes, shared,
                                             None if margin == MARGIN_OFF else float(margin), task_name)
        _log(f"fit-and-evaluate on {doc['evaluation']['users']} unseen users: {doc['evaluation']['metrics']}")
    return finish("done")


app = ServerApp()  # `flwr run` loads it (pyproject: [tool.flwr.app.components])


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(grid, settings.resolve(context.run_config))
