"""One train round under SecAgg+ (setting secagg=true): Flower's `SecAggPlusWorkflow`, driven from FedHydra's loop.

SecAgg+ exists only on Flower's legacy path (PRIVACY.md "Secure aggregation"), so a round builds what the
workflow needs around FedHydra's own loop: a `GridClientProxy` per live train node in a `SimpleClientManager`,
a `LegacyContext` holding the round and the module's arrays, and Flower's legacy FedAvg (which samples the
clients, with `random`, seeded per round like the Message-API path). The clients (client/client_app.py:
`secaggplus_mod`, then the legacy-fit adapter and `fixedclipping_mod`) return their update as a **delta**
clipped to L2 norm C with num_examples = 1, so with clipping_range = C and max_weight = 1 no value
saturates and the unmasked result is the plain mean of the deltas, up to SecAgg+'s quantization
(2 C / 2^22 per value). The server never sees an individual update: only the mean, to which central DP
(dp=user) adds its noise (server/central_dp.py `add_noise`). Metrics and num_examples stay visible.

Every workflow stage waits at most round-timeout. Fewer than 2 sampled clients is an error (the protocol
needs 2). Under dp=user a round with fewer results than sampled clients releases nothing (as in the
Message-API path); without DP the mean is over the clients that answered, as FedAvg's would be.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedhydra.common.protocol import ARRAY_NAMES  # legacy Parameters carry no names: the fit config lists them

from .central_dp import UserLevelDP
from .strategy import GridView

# Every sampled client shares its secrets with all others (fine for tens of clients); 2/3 of the shares
# rebuild a dropped client's mask, so a third of the clients may drop between stages.
NUM_SHARES = 1.0
RECONSTRUCTION_THRESHOLD = 2 / 3
QUANTIZATION_RANGE = 2**22  # Flower's default; the tolerance of the mean is 2 * clip / QUANTIZATION_RANGE


def sample_size(live: int, fraction: float) -> int:
    """How many clients a SecAgg+ round samples among `live` (legacy FedAvg's rule); at least 2 or an error."""
    n = max(int(live * fraction), 1)
    if n < 2:
        raise ValueError(f"secagg needs at least 2 sampled train clients per round; {live} train client(s) x "
                         f"fraction-train {fraction} gives {n}")
    return n


def payload_bytes(content: RecordDict) -> int:
    """Bytes of arrays and of byte values in config records (where SecAgg+ puts keys, shares, masked vectors)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(a.data) for a in record.values())
        elif isinstance(record, ConfigRecord):
            for value in record.values():
                items = value if isinstance(value, list) else [value]
                total += sum(len(v) for v in items if isinstance(v, bytes))
    return total


class CountingGrid(GridView):
    """The run's grid, counting the bytes each node gets and sends over all of a round's SecAgg+ stages."""

    def __init__(self, grid: Grid):
        super().__init__(grid)
        self.down, self.up = {}, {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for m in messages:
            node = m.metadata.dst_node_id
            self.down[node] = self.down.get(node, 0) + payload_bytes(m.content)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            if not r.has_error():
                node = r.metadata.src_node_id
                self.up[node] = self.up.get(node, 0) + payload_bytes(r.content)
        return replies


class _KeepResults(LegacyFedAvg):
    """Legacy FedAvg that keeps what SecAgg+ hands to aggregate_fit: per client only the metrics and
    num_examples (its parameters are already the secure mean)."""

    results: list[tuple[ClientProxy, FitRes]] | None = None
    failures: int = 0

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures = list(results), len(failures)
        return super().aggregate_fit(server_round, results, failures)


@dataclass
class SecAggRound:
    arrays: dict[str, np.ndarray] | None  # the module's new arrays; None: nothing released
    metrics: dict[int, dict] = field(default_factory=dict)  # node -> its (clear) fit metrics
    sampled: int = 0
    bytes: dict[str, dict] = field(default_factory=dict)
    note: str = ""


def train_round(grid: Grid, values: dict, server_round: int, nodes: list[int], arrays: dict[str, np.ndarray],
                config: dict, dp: UserLevelDP | None) -> SecAggRound:
    """One SecAgg+ round of the module in `arrays` over the live train `nodes`."""
    clip, timeout = float(values["dp-clip"]), float(values["round-timeout"])
    if timeout <= 0:
        raise ValueError("secagg needs a positive round-timeout (SecAgg+ would otherwise wait forever)")
    live = [n for n in nodes if n in set(grid.get_node_ids())]
    n = sample_size(len(live), float(values["fraction-train"]))
    if dp:
        dp.check_budget(n)  # before any message is sent
    counting = CountingGrid(grid)
    manager = SimpleClientManager()
    run_id = getattr(grid.run, "run_id", 0) if grid.run is not None else 0
    for node in live:
        manager.register(GridClientProxy(node, counting, run_id))
    fit_config = {**config, ARRAY_NAMES: "\n".join(arrays), KEY_CLIPPING_NORM: clip}
    strategy = _KeepResults(fraction_fit=float(values["fraction-train"]), fraction_evaluate=0.0, min_fit_clients=n,
                            min_available_clients=n, on_fit_config_fn=lambda _: dict(fit_config))
    context = LegacyContext(Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy,
                            client_manager=manager)
    sent = [np.asarray(v) for v in arrays.values()]
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(sent), keep_input=True)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    workflow = SecAggPlusWorkflow(NUM_SHARES, RECONSTRUCTION_THRESHOLD, max_weight=1.0, clipping_range=clip,
                                  quantization_range=QUANTIZATION_RANGE, timeout=timeout)
    workflow(counting, context)
    results = strategy.results or []
    out = SecAggRound(None, {p.node_id: dict(r.metrics) for p, r in results}, n,
                      {str(k): {"down": counting.down.get(k, 0), "up": counting.up.get(k, 0)} for k in counting.up})
    if not results:
        out.note = "secure aggregation halted (too few clients answered a stage)"
        return out
    if dp and len(results) != n:
        out.note = f"skipped: {len(results)} of {n} sampled clients answered; nothing released, no epsilon spent"
        return out
    mean = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
        context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
    if dp:
        dp.add_noise(mean, n)
    out.arrays = {k: (v + m).astype(v.dtype) for (k, v), m in zip(arrays.items(), mean, strict=True)}
    return out

