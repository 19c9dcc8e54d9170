"""The Flower ClientApp: Flower's messages in, client/trainer.py's work, Flower's messages out.

Messages (all sent by server/server_app.py; their keys and pack/unpack helpers: common/protocol.py):
- DESCRIBE:   -> counts of train / test users and the task name
- INSTALL:    a module's final shared arrays to keep (the reranker, before the adapter rounds)
- TRAIN:      one module's shared arrays -> the same arrays trained, and training metrics
- CALIBRATE:  the final adapter -> additive sums per adapter margin over held-out training queries
- EVALUATE:   both final modules + the margin -> additive metric statistics of the unseen users
Only shared arrays and numbers ever leave (tests/test_federation.py checks every reply).
Privacy (PRIVACY.md): the train handler runs inside client/train_mods.py's mods, each switched on by the
client's own settings: SecAgg+ (secagg), Flower's fixed clipping of the update (dp=user or secagg), and
equal weights with only cost metrics in DP mode.

Settings: the run config (common/settings.py), overridden by the SuperNode's node config. The client's
private state folder is node config `state="DIR"`, else `state-root/client-<partition-id>`; a missing
folder is made from the `data` settings and the partition id (the users this partition holds).
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common.logger import log

from fedhydra.common import protocol as p
from fedhydra.common import settings, training
from fedhydra.common.config import HydraConfig

from . import trainer
from .privacy_ledger import DPSettings
from .state import ClientState, StateError, check_origin, partition_origin
from .train_mods import legacy_fit_mod, public_metrics_mod

NODE_KEYS = ("state", "partition-id", "num-partitions")


def client_settings(context: Context) -> dict:
    """Defaults < run config < node config. A node may set only what is its own (its state folder, threads, its LLM
    endpoint: the llm group and run-free settings); anything the whole run must agree on (rounds, sizes, seed,
    privacy) comes from the run config, and a node config that sets it is refused, naming the key."""
    node = dict(context.node_config)
    shared = sorted(k for k in node if k in settings.SETTINGS and k not in settings.NODE_SETTINGS)
    if shared:
        raise StateError(f"node config sets {', '.join(shared)}, which every client of a run must share: set it in "
                         "the run config (flwr run --run-config) instead; a node may set "
                         f"{', '.join(settings.NODE_SETTINGS)}")
    return settings.resolve(context.run_config, {k: v for k, v in node.items() if k not in NODE_KEYS},
                            extra_keys=NODE_KEYS) | {k: node[k] for k in NODE_KEYS if k in node}


def client_state(values: dict) -> ClientState:
    """The client's state folder, made on first use from its partition of the users."""
    pid = values.get("partition-id")
    folder = values.get("state") or (pid is not None and Path(values["state-root"]) / f"client-{int(pid)}")
    if not folder:
        raise StateError("the client needs its state folder: node config state=\"DIR\" or a partition-id")
    if (Path(folder) / "client.json").is_file():
        state = ClientState(folder)
        if pid is not None:  # a partition's folder: made from these settings, or refused (never another run's)
            check_origin(Path(folder), state.origin, partition_origin(values, int(pid)))
        return state
    if pid is None:
        raise StateError(f"{folder} holds no client state and this node has no partition-id to make it from")
    from fedhydra.common.partition import federated_split, load_users

    if values["data"] and not Path(values["data"]).is_absolute():
        raise StateError(f"data={values['data']!r} is a relative path, but this ClientApp runs in {Path.cwd()}: "
                         "give the run an absolute path (the fedhydra commands make every path absolute)")
    split = load_users(values)
    parts = federated_split(split, values)
    if "num-partitions" in values and int(values["num-partitions"]) != len(parts):
        raise StateError(f"{values['num-partitions']} partitions (nodes) but the settings make {len(parts)} clients "
                         f"({values['clients']} train + {values['test-clients']} test)")
    role, users = parts[int(pid)]
    return ClientState.create(folder, split.task, users, role, origin=partition_origin(values, int(pid)))


def _say(values: dict):
    who = f"client {values['partition-id']}" if "partition-id" in values else f"client {values.get('state')}"
    return lambda text: log(INFO, "[fedhydra %s] %s", who, text)


def _setup(context: Context):
    values = client_settings(context)
    trainer.set_threads(int(values["threads"]))
    state = client_state(values)
    return values, state, HydraConfig.from_settings(values), _say(values)


def describe(msg: Message, context: Context) -> Message:
    values = client_settings(context)
    state = client_state(values)
    return p.describe_reply(msg, len(state.user_ids("train")), len(state.user_ids("test")), state.task.name)


def install(msg: Message, context: Context) -> Message:
    values, state, cfg, say = _setup(context)
    arrays = p.arrays_of(msg)
    trainer.install(state, cfg, arrays)
    say(f"installed the final {p.install_module(msg)}")
    return p.install_reply(msg, len(arrays))


def train(msg: Message, context: Context) -> Message:
    values, state, cfg, say = _setup(context)
    rounds = int(values["rounds"])
    request = p.TrainRequest.unpack(msg, rounds)
    lr_span = training.round_lr_span(values["lr-schedule"], p.module_round(request.server_round, rounds)[1], rounds)
    llm = trainer.client_llm(state, values)
    arrays, metrics = trainer.train_round(state, llm, cfg, request.module, request.arrays, request.server_round,
                                          request.reranker_digest, proximal_mu=request.proximal_mu, say=say,
                                          privacy=DPSettings.from_settings(values), lr_span=lr_span)
    return p.reply(msg, metrics, arrays)


def calibrate(msg: Message, context: Context) -> Message:
    values, state, cfg, say = _setup(context)
    return p.reply(msg, trainer.calibration_sums(state, trainer.client_llm(state, values), cfg, p.arrays_of(msg), say))


def evaluate(msg: Message, context: Context) -> Message:
    values, state, cfg, say = _setup(context)
    stats, extra = trainer.fit_and_evaluate(state, trainer.client_llm(state, values), cfg, p.arrays_of(msg),
                                            p.evaluate_margin(msg), say=say)
    return p.evaluate_reply(msg, stats, extra)


def _when(test, mod):
    """`mod` where the client's own settings pass `test`, else straight through."""
    def conditional(msg: Message, context: Context, call_next) -> Message:
        values = client_settings(context)
        return mod(msg, context, call_next) if test(values) else call_next(msg, context)

    conditional.__name__ = f"{getattr(mod, '__name__', 'mod')}_when_enabled"
    return conditional


def _metrics_mod(msg: Message, context: Context, call_next) -> Message:
    values = client_settings(context)
    if values["dp"] == "off" and not values["secagg"]:
        return call_next(msg, context)
    return public_metrics_mod(msg, context, call_next, dp=values["dp"] != "off")


def train_mods(inner: list | None = None) -> list:
    """The train handler's privacy mods, outermost first (client/train_mods.py). `inner` mods go between the
    SecAgg+ adapter and the clipping: they see a Message-API train message and its clipped reply, before
    SecAgg+ masks it (tests record what each client contributes there)."""
    return [_when(lambda v: v["secagg"], secaggplus_mod), _when(lambda v: v["secagg"], legacy_fit_mod),
            *(inner or []), _when(lambda v: v["dp"] == "user" or v["secagg"], fixedclipping_mod), _metrics_mod]


def build_app(mods: list | None = None, inner_train_mods: list | None = None) -> ClientApp:
    """The ClientApp; `mods` wrap every message (tests record every reply with one), `inner_train_mods`
    the train handler inside the privacy mods (see train_mods)."""
    client_app = ClientApp(mods=mods or [])
    p.DESCRIBE.register(client_app, describe)
    p.INSTALL.register(client_app, install)
    p.TRAIN.register(client_app, train, mods=train_mods(inner_train_mods))
    p.CALIBRATE.register(client_app, calibrate)
    p.EVALUATE.register(client_app, evaluate)
    return client_app


app = build_app()  # `flwr run` and the SuperNodes load it (pyproject: [tool.flwr.app.components])
