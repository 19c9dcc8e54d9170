"""The federated run's settings: Flower's run config (pyproject `[tool.flwr.app.config]`,
`flwr run --run-config`, or the simulation harness) over these defaults.

The server is the one source of the HYDRA configuration: it sends it to every client with
each message, so all clients train with the same sizes, prompt format and seed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields

from fedhydra.common.config import HydraConfig, get_config

DEFAULTS: dict[str, object] = {
    "task": "",  # expected task; every client's state must hold it ("" = take the clients')
    "rounds": 3,  # FedAvg rounds per module: the reranker's rounds, then the adapter's
    "local-epochs": 1,  # epochs over its own labels a client trains per round
    "clients-per-round": 0,  # train clients sampled per round (0 = all)
    "min-nodes": 2,  # nodes to wait for before the first round
    "node-wait": 300.0,  # seconds to wait for min-nodes to connect
    "round-timeout": 3600.0,  # seconds a round waits for replies; clients that miss it are left out
    "preset": "cpu",
    "lr": 0.0,  # 0: the preset's
    "head-lr": 0.0,
    "train-layers": 0,
    "pseudo-queries": 0,
    "retrieve": 0,
    "k": 0,
    "candidates": 0,
    "seed": 0,
    "llm": "embedded",
    "llm-base-url": "",
    "llm-model": "",
    "out": "runs/federated",  # server-side results and checkpoint folder
    "resume": False,
    "stop-after-round": 0,  # stop cleanly after this round (0 = run to the end); resume later
}


@dataclass(frozen=True)
class FedSettings:
    task: str
    rounds: int
    local_epochs: int
    clients_per_round: int
    min_nodes: int
    node_wait: float
    round_timeout: float
    out: str
    resume: bool
    stop_after_round: int
    llm: str
    llm_base_url: str
    llm_model: str
    hydra: HydraConfig

    @classmethod
    def from_config(cls, run_config: dict, defaults: dict | None = None) -> "FedSettings":
        merged = {**DEFAULTS, **(defaults or {}), **{k: v for k, v in dict(run_config).items()}}
        unknown = sorted(set(merged) - set(DEFAULTS) - {"state-root", "llm-shared-cache", "llm-threads", "threads"})
        if unknown:
            raise ValueError(f"unknown run config key(s) {unknown}; known: {sorted(DEFAULTS)}")
        m = merged
        rounds, epochs = int(m["rounds"]), int(m["local-epochs"])
        if rounds < 1 or epochs < 1:
            raise ValueError(f"rounds ({rounds}) and local-epochs ({epochs}) must be at least 1")
        if int(m["min-nodes"]) < 1:
            raise ValueError(f"min-nodes must be at least 1, got {m['min-nodes']}")

        def opt(key, cast):  # 0 / "" mean "the preset's value"
            return cast(m[key]) if m[key] else None

        hydra = get_config(str(m["preset"]), seed=int(m["seed"]), epochs=epochs, lr=opt("lr", float),
                           head_lr=opt("head-lr", float), train_layers=opt("train-layers", int),
                           pseudo_queries=opt("pseudo-queries", int), retrieve=opt("retrieve", int),
                           k=opt("k", int), candidates=opt("candidates", int))
        return cls(task=str(m["task"]), rounds=rounds, local_epochs=epochs,
                   clients_per_round=int(m["clients-per-round"]), min_nodes=int(m["min-nodes"]),
                   node_wait=float(m["node-wait"]), round_timeout=float(m["round-timeout"]), out=str(m["out"]),
                   resume=bool(m["resume"]), stop_after_round=int(m["stop-after-round"]), llm=str(m["llm"]),
                   llm_base_url=str(m["llm-base-url"]), llm_model=str(m["llm-model"]), hydra=hydra)

    def fingerprint(self) -> str:
        """What a checkpoint must match to be continued (not the stop/resume/timeout knobs)."""
        keep = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("resume", "stop_after_round", "round_timeout", "node_wait", "out", "min_nodes")}
        keep["hydra"] = self.hydra.as_dict()
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def total_rounds(self) -> int:
        return 2 * self.rounds

    def module_of(self, server_round: int) -> str:
        """Rounds 1..R train the reranker, R+1..2R the adapter (HYDRA trains the reranker first:
        the adapter's labels come from prompts built with the trained reranker's top-k)."""
        return "reranker" if server_round <= self.rounds else "adapter"
