"""Flower's own strategies over FedHydra's shared arrays, and what the server needs around them.

One strategy instance per module: the reranker's rounds, then the adapter's, each see only their
module's arrays, so a stateful strategy (FedAdam's moments, FedAvgM's momentum) never mixes the two.
`NodeSubset` lets a strategy sample among the train clients only (test clients hold unseen users and
never train); `FixedNodes` freezes that set for a DP round. `state_arrays` / `load_state_arrays` carry a
strategy's state through a checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Strategy

from fedhydra.common.protocol import NUM_EXAMPLES

# Flower's defaults where FedHydra's settings say 0 (server-lr); see common/settings.py.
ADAPTIVE_ETA = 1e-3
STATE_ATTRS = ("current_arrays", "m_t", "v_t", "momentum_vector")


def make_strategy(values: dict) -> Strategy:
    """The strategy the `strategy` setting names, configured from the federation settings."""
    name = values["strategy"]
    common = dict(fraction_train=float(values["fraction-train"]), fraction_evaluate=0.0, min_train_nodes=1,
                  min_available_nodes=1, weighted_by_key=NUM_EXAMPLES)
    lr = float(values["server-lr"])
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=float(values["proximal-mu"]))
    if name == "fedavgm":
        return FedAvgM(**common, server_learning_rate=lr or 1.0, server_momentum=float(values["server-momentum"]))
    adaptive = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}
    if name in adaptive:
        kw = dict(eta=lr or ADAPTIVE_ETA)
        if name != "fedadagrad":
            kw["beta_1"] = float(values["server-momentum"])
        return adaptive[name](**common, **kw)
    raise ValueError(f"unknown strategy {name!r}")


class GridView(Grid):
    """A Grid that hands everything to the run's grid; subclasses change the one thing they are about."""

    def __init__(self, grid: Grid):
        self._grid = grid

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class NodeSubset(GridView):
    """A Grid that shows a strategy only `node_ids`; everything else goes to the real grid."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]):
        super().__init__(grid)
        self._ids = sorted(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        live = set(self._grid.get_node_ids())
        return [n for n in self._ids if n in live]


class FixedNodes(NodeSubset):
    """Exactly `node_ids` (checked live by the caller just before): a DP round's sample size, which sizes its
    noise, must not change between counting the nodes and sampling them."""

    def get_node_ids(self) -> Iterable[int]:
        return list(self._ids)


def _inner(strategy: Strategy) -> Strategy:
    """The strategy that holds the state (DP wrappers keep theirs in `.strategy`)."""
    return getattr(strategy, "strategy", strategy)


def state_arrays(strategy: Strategy) -> dict[str, np.ndarray]:
    """The strategy's state as flat named arrays ("<attr>/<kind>/<key>"); {} for a stateless one (FedAvg)."""
    out = {}
    for attr in STATE_ATTRS:
        value = getattr(_inner(strategy), attr, None)
        if value is None:
            continue
        if isinstance(value, ArrayRecord):
            kind, items = "record", {k: a.numpy() for k, a in value.items()}
        elif isinstance(value, dict):
            kind, items = "dict", value
        else:
            kind, items = "list", {f"{i:06d}": v for i, v in enumerate(value)}
        out |= {f"{attr}/{kind}/{k}": np.asarray(v) for k, v in items.items()}
    return out


def load_state_arrays(strategy: Strategy, arrays: dict[str, np.ndarray]) -> None:
    """Put back what state_arrays() returned."""
    grouped: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, value in arrays.items():
        attr, kind, key = name.split("/", 2)
        if attr not in STATE_ATTRS:
            raise ValueError(f"unexpected strategy state {name!r}")
        grouped.setdefault((attr, kind), {})[key] = np.asarray(value)
    target = _inner(strategy)
    for (attr, kind), items in grouped.items():
        if kind == "record":
            setattr(target, attr, ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in items.items()}))
        elif kind == "dict":
            setattr(target, attr, dict(items))
        else:
            setattr(target, attr, [items[k] for k in sorted(items)])
