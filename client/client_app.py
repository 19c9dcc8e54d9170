"""The Flower ClientApp: Flower's messages in, client/trainer.py's work, Flower's messages out.

Message types (the server sends all three):
- query:    "which users do you hold?" -> metrics train-users / test-users (counts only), the task name
- train:    shared arrays of both modules + config (module, round, HydraConfig) -> the trained
            module's shared arrays + training metrics
- evaluate: the final shared arrays -> additive metric statistics of the unseen users' answers

The client's settings come from (first wins) the SuperNode's node config, the run config,
and the defaults given to make_client_app (the simulation harness passes them):
    state             its private state folder (deployment: one per SuperNode)
    state-root        simulation: the folder holding client-<partition-id> state folders
    llm, llm-base-url, llm-model, llm-threads, llm-shared-cache, threads
Only shared arrays and metrics are ever put in a reply (tests/test_federation_privacy.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedhydra.common.config import HydraConfig

from . import trainer
from .state import ClientState


def _setting(context: Context, defaults: dict, key: str, fallback=None):
    for source in (context.node_config, context.run_config, defaults):
        if key in source and source[key] not in ("", None):
            return source[key]
    return fallback


def _state(context: Context, defaults: dict) -> ClientState:
    folder = _setting(context, defaults, "state")
    if folder is None:
        root = _setting(context, defaults, "state-root")
        if root is None or "partition-id" not in context.node_config:
            raise ValueError("the client needs its state folder: node config `state=\"DIR\"` (deployment) "
                             "or `state-root` with a partition-id (simulation)")
        folder = Path(str(root)) / f"client-{int(context.node_config['partition-id'])}"
    return ClientState(str(folder))


def _llm(context: Context, defaults: dict, msg_config, state: ClientState):
    def get(key, fallback=None):
        value = _setting(context, defaults, key)
        if value is None and msg_config is not None and key in msg_config:
            value = msg_config[key]
        return fallback if value in (None, "") else value

    return trainer.client_llm(state, backend=str(get("llm", "embedded")), base_url=get("llm-base-url"),
                              model=get("llm-model"), shared_cache=get("llm-shared-cache"),
                              threads=int(get("llm-threads", 1)))


def _arrays(msg: Message) -> dict:
    return msg.content["arrays"].to_torch_state_dict()


def _hydra_config(msg: Message) -> HydraConfig:
    return HydraConfig(**json.loads(msg.content["config"]["hydra-config"]))


def make_client_app(defaults: dict | None = None, mods: list | None = None) -> ClientApp:
    """A ClientApp whose settings fall back to `defaults` (see the module docstring); `mods` are
    Flower mods wrapping every message (e.g. a recorder of outgoing messages in tests)."""
    defaults = dict(defaults or {})
    app = ClientApp(mods=mods or [])

    @app.query()
    def describe(msg: Message, context: Context) -> Message:
        state = _state(context, defaults)
        metrics = {"train-users": len(state.user_ids("train")), "test-users": len(state.user_ids("test"))}
        return Message(RecordDict({"metrics": MetricRecord(metrics), "config": ConfigRecord({"task": state.task.name})}),
                       reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        trainer.set_threads(int(_setting(context, defaults, "threads", 1)))
        state = _state(context, defaults)
        config = msg.content["config"]
        llm = _llm(context, defaults, config, state)
        arrays, metrics = trainer.train_round(state, llm, _hydra_config(msg), str(config["module"]), _arrays(msg),
                                              int(config["server-round"]))
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        trainer.set_threads(int(_setting(context, defaults, "threads", 1)))
        state = _state(context, defaults)
        llm = _llm(context, defaults, msg.content["config"], state)
        metrics = trainer.fit_and_evaluate(state, llm, _hydra_config(msg), _arrays(msg))
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


# The app `flwr run` and the SuperNodes load (pyproject: [tool.flwr.app.components]).
app = make_client_app()
