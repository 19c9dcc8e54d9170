"""The federation's protocol, declared once: the messages the ServerApp (server/server_app.py) and the
ClientApp (client/client_app.py) exchange, the keys of their records, the module names and the answer modes,
and the helpers both sides pack and unpack the messages with.

Messages (Flower message types "<category>[.<action>]"; every request and reply has at most one record of
each kind: ARRAYS, CONFIG, METRICS, Flower's strategies' defaults)
- DESCRIBE   query.describe      ->  metrics TRAIN_USERS, TEST_USERS; config TASK
- INSTALL    query.install       arrays of one module, config MODULE  ->  metrics INSTALLED (arrays kept)
- TRAIN      train               arrays of one module, config MODULE, SERVER_ROUND, RERANKER_DIGEST (plus what
                                 Flower's strategy and DP wrapper add: PROXIMAL_MU, the clipping norm)
                                 ->  the same arrays trained; metrics NUM_EXAMPLES, USERS, LOSS, ACCURACY,
                                 COSTS, and under dp=record the DP_* privacy report
- CALIBRATE  evaluate.calibrate  the final adapter  ->  metrics: additive sums per adapter margin
- EVALUATE   evaluate            both final modules, config MARGIN  ->  metrics STAT-prefixed additive metric
                                 statistics, USERS, COSTS
Under SecAgg+ the train message travels as Flower's legacy fit message (client/train_mods.py), with the
arrays' names in the config under ARRAY_NAMES.

Round numbers. A train message carries one: Flower's SERVER_ROUND, which Flower's strategy writes into every
train message it configures (FedHydra's own "round" key, which duplicated it, was dropped). Its value is the
round of the module's own strategy (1..R for each module): each module has a fresh strategy whose arithmetic
counts from 1 (FedAdam's bias correction uses the round), so passing it the run's round would change results.
The run's round (reranker 1..R, adapter R+1..2R; seeds, checkpoints, logs and the privacy ledger use it) is
derived on both sides with `run_round` (the client knows R: its `rounds` setting, checked against the message).

Flower and numpy are imported inside the helpers, not here: the names are also read by the CLI's parser and
the service client, which start without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

# ---------------------------------------------------------------- modules and answer modes
RERANKER, ADAPTER = "reranker", "adapter"
MODULES = (RERANKER, ADAPTER)  # trained in this order: the adapter's labels come from the reranker's prompts
FULL = "full"
ANSWER_MODES = (FULL, RERANKER, ADAPTER)  # both modules answer, or one of them alone (an ablation)
# The shared arrays a message carries are named "<module>/<part>/<parameter>": a module's trainable base
# layers or its default head (hydra.shared_arrays). Personal heads never travel.
BASE_PART, HEAD_PART = "base", "default-head"
ARRAY_PARTS = (BASE_PART, HEAD_PART)

# ---------------------------------------------------------------- record names (Flower's strategies' defaults)
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"

# ---------------------------------------------------------------- config keys
MODULE = "module"
SERVER_ROUND = "server-round"  # Flower's: FedAvg.configure_train writes it (see the module docstring)
RERANKER_DIGEST = "reranker-digest"
PROXIMAL_MU = "proximal-mu"  # Flower's: FedProx.configure_train writes it
MARGIN = "margin"
TASK = "task"
ARRAY_NAMES = "array-names"  # SecAgg+'s legacy fit message has no array names: the config lists them

# ---------------------------------------------------------------- metric keys
TRAIN_USERS, TEST_USERS = "node-train-users", "node-test-users"  # how many users of each role a node holds
INSTALLED = "installed"
NUM_EXAMPLES = "num-examples"  # Flower's strategies weight by it (weighted_by_key)
USERS, LOSS, ACCURACY = "users", "loss", "accuracy"
LLM_CALLS, TOKENS, CACHE_HITS, SECONDS = "llm-calls", "tokens", "cache-hits", "seconds"
COSTS = (LLM_CALLS, TOKENS, CACHE_HITS, SECONDS)
# What a DP client's train reply may still say: weights and costs, not statistics of its data; keys starting
# with DP_PREFIX are the record-level privacy report, public by design (client/train_mods.py).
PUBLIC_TRAIN_METRICS = (NUM_EXAMPLES, *COSTS)
DP_PREFIX = "dp-"
DP_EXHAUSTED = "dp-exhausted"
DP_EPSILON = "dp-epsilon-spent"
DP_ITEM_EPSILON = "dp-item-epsilon"
DP_ITEM_UNITS = "dp-item-units"
DP_DELTA = "dp-delta"
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
DP_CLIP = "dp-clip"
DP_SAMPLE_RATE = "dp-sample-rate"
DP_STEPS = "dp-steps"
DP_TOTAL_STEPS = "dp-total-steps"
DP_UNITS = "dp-units"
STAT = "stat:"  # prefix of an evaluate reply's metric statistics


@dataclass(frozen=True)
class Kind:
    """A message type: Flower's category (flwr.app.MessageType: train, evaluate, query) and our action ("" for
    Flower's default one)."""

    category: str
    action: str = ""

    @property
    def message_type(self) -> str:
        return f"{self.category}.{self.action}" if self.action else self.category

    def register(self, app, handler, mods: list | None = None) -> None:
        """Route this kind of message to `handler` in a flwr ClientApp."""
        decorate = getattr(app, self.category)
        (decorate(self.action, mods=mods) if self.action else decorate(mods=mods))(handler)


DESCRIBE = Kind("query", "describe")
INSTALL = Kind("query", "install")
TRAIN = Kind("train")
CALIBRATE = Kind("evaluate", "calibrate")
EVALUATE = Kind("evaluate")
KINDS = (DESCRIBE, INSTALL, TRAIN, CALIBRATE, EVALUATE)


# ---------------------------------------------------------------- both sides
def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    import numpy as np
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def arrays_of(content: Message | RecordDict) -> dict[str, np.ndarray]:
    """The named arrays a message (or its content) carries."""
    content = getattr(content, "content", content)
    return {k: a.numpy() for k, a in content[ARRAYS].items()}


def array_key(module: str, part: str, param: str) -> str:
    return f"{module}/{part}/{param}"


def split_array_key(key: str) -> tuple[str, str, str]:
    """(module, part, parameter) of a shared array's name; anything else is refused."""
    parts = key.split("/", 2)
    if len(parts) != 3 or parts[0] not in MODULES or parts[1] not in ARRAY_PARTS:
        raise ValueError(f"unexpected array {key!r} in a shared payload")
    return parts[0], parts[1], parts[2]


def of_module(arrays: dict[str, np.ndarray], module: str) -> dict[str, np.ndarray]:
    """The arrays of one module."""
    return {k: v for k, v in arrays.items() if k.startswith(module + "/")}


def metrics_of(msg: Message) -> dict:
    return dict(msg.content[METRICS])


def run_round(module: str, module_round: int, rounds: int) -> int:
    """The run's round of `module`'s `module_round` (1..rounds): the reranker's rounds come first."""
    if module not in MODULES:
        raise ValueError(f"unknown module {module!r}; modules: {MODULES}")
    if not 1 <= module_round <= rounds:
        raise ValueError(f"{module} round {module_round} is outside 1..{rounds} (the rounds setting): the server "
                         "and this client disagree on rounds")
    return MODULES.index(module) * rounds + module_round


def module_round(server_round: int, rounds: int) -> tuple[str, int]:
    """(module, its own round) of the run's round `server_round`: run_round's inverse."""
    if not 1 <= server_round <= len(MODULES) * rounds:
        raise ValueError(f"round {server_round} is outside 1..{len(MODULES) * rounds}")
    return MODULES[(server_round - 1) // rounds], (server_round - 1) % rounds + 1


# ---------------------------------------------------------------- the server's requests
def request(kind: Kind, node: int, arrays: dict[str, np.ndarray] | None = None, **config) -> Message:
    """A message of `kind` to `node`: its arrays and config (keyword names are the config keys with "_" for "-")."""
    from flwr.app import ConfigRecord, Message, RecordDict

    content = {CONFIG: ConfigRecord({k.replace("_", "-"): v for k, v in config.items()})}
    if arrays is not None:
        content[ARRAYS] = array_record(arrays)
    return Message(RecordDict(content), dst_node_id=node, message_type=kind.message_type)


def describe_request(node: int) -> Message:
    return request(DESCRIBE, node)


def install_request(node: int, module: str, arrays: dict[str, np.ndarray]) -> Message:
    return request(INSTALL, node, arrays, module=module)


def train_config(module: str, reranker_digest: str = "") -> ConfigRecord:
    """The train message's config; Flower's strategy adds SERVER_ROUND (and FedProx PROXIMAL_MU) to it."""
    from flwr.app import ConfigRecord

    return ConfigRecord({MODULE: module, RERANKER_DIGEST: reranker_digest})


def calibrate_request(node: int, adapter: dict[str, np.ndarray]) -> Message:
    return request(CALIBRATE, node, adapter)


def evaluate_request(node: int, shared: dict[str, np.ndarray], margin: float | None) -> Message:
    """`margin` None: answers stay greedy (sent as -1: a ConfigRecord holds no None)."""
    return request(EVALUATE, node, shared, margin=-1.0 if margin is None else float(margin))


# ---------------------------------------------------------------- the client's side
@dataclass(frozen=True)
class TrainRequest:
    """What a train message asks: train `module`'s `arrays` in the run's round `server_round`."""

    module: str
    server_round: int
    arrays: dict[str, np.ndarray]
    reranker_digest: str = ""
    proximal_mu: float = 0.0

    @classmethod
    def unpack(cls, msg: Message, rounds: int) -> "TrainRequest":
        config = msg.content[CONFIG]
        module = str(config[MODULE])
        return cls(module, run_round(module, int(config[SERVER_ROUND]), rounds), arrays_of(msg),
                   str(config.get(RERANKER_DIGEST, "")), float(config.get(PROXIMAL_MU, 0.0)))


def install_module(msg: Message) -> str:
    return str(msg.content[CONFIG][MODULE])


def evaluate_margin(msg: Message) -> float | None:
    """The adapter margin an evaluate message asks for (None: greedy answers); see evaluate_request."""
    margin = float(msg.content[CONFIG][MARGIN])
    return None if margin < 0 else margin


def reply(msg: Message, metrics: dict, arrays: dict[str, np.ndarray] | None = None,
          config: dict | None = None) -> Message:
    """The reply to `msg`: its metrics, and arrays and config where the message kind has them."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    content = {METRICS: MetricRecord(metrics)}
    if arrays is not None:
        content[ARRAYS] = array_record(arrays)
    if config is not None:
        content[CONFIG] = ConfigRecord(config)
    return Message(RecordDict(content), reply_to=msg)


def describe_reply(msg: Message, train_users: int, test_users: int, task: str) -> Message:
    return reply(msg, {TRAIN_USERS: train_users, TEST_USERS: test_users}, config={TASK: task})


def install_reply(msg: Message, installed: int) -> Message:
    return reply(msg, {INSTALLED: installed})


def evaluate_reply(msg: Message, stats: dict[str, float], extra: dict) -> Message:
    """Additive metric statistics (STAT-prefixed) and the other metrics (USERS, COSTS)."""
    return reply(msg, {**{STAT + k: v for k, v in stats.items()}, **extra})


# ---------------------------------------------------------------- the server reads the replies
@dataclass(frozen=True)
class Description:
    """A node's answer to DESCRIBE."""

    train_users: int
    test_users: int
    task: str

    @classmethod
    def unpack(cls, msg: Message) -> "Description":
        m = msg.content[METRICS]
        return cls(int(m[TRAIN_USERS]), int(m[TEST_USERS]), str(msg.content[CONFIG][TASK]))


def summed(replies: list[Message], prefix: str = "") -> dict[str, float]:
    """The replies' metrics starting with `prefix` (the prefix dropped), summed key by key: additive statistics."""
    sums: dict[str, float] = {}
    for r in replies:
        for k, v in r.content[METRICS].items():
            if k.startswith(prefix):
                sums[k[len(prefix):]] = sums.get(k[len(prefix):], 0.0) + float(v)
    return sums
