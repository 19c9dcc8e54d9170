"""Benchmark: record-level DP (client/privacy.py) on one client, what it costs and what it guarantees.

1. Time per step: DP-SGD (per-row gradients, summed per unit, clipped, noised) against train_stage's plain
   step on the same reranker examples and the same batch of about --batch-size rows.
2. The privacy figures of a client under the cpu preset: units, K (the most units one item enters), the
   noise multiplier planned for --rounds reranker + --rounds adapter rounds at --epsilon, and epsilon for a
   unit and for an item after every round.

Labels come from synthetic LaMP-2M users with real BM25 retrieval and a fixed-answer stand-in for the LLM:
an example's sources (hence K) and the units do not depend on the LLM's answers, only on the retrieval.
Run: .venv/bin/python benchmarks/bench_privacy.py [--users 1] [--rounds 3] [--epsilon 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedhydra.client.privacy import item_units, privacy_units, train_record_dp
from fedhydra.client.privacy_ledger import DPSettings, PrivacyLedger
from fedhydra.common import hydra, labels
from fedhydra.common.config import get_config
from fedhydra.common.llm.base import LLMStats
from fedhydra.common.retrieval import Retriever
from fedhydra.common.synthetic import make_synthetic
from fedhydra.common.training import train_stage


class FixedLLM:
    """Answers "comedy" to everything: enough to build units whose sources are real."""

    name, stats = "fixed", LLMStats()

    def complete(self, messages, n=1, temperature=0.0, max_tokens=64, seed=0):
        return ["comedy"] * n


def client_examples(cfg, users: int, seed: int) -> dict[str, list]:
    split = make_synthetic("LaMP_2M", n_users=users, seed=seed)
    task, llm, out = split.task, FixedLLM(), {"reranker": [], "adapter": []}
    for user in split.users:
        pqs = labels.pseudo_queries(task, llm, user, cfg, real_query=True)
        out["reranker"] += labels.reranker_examples(task, llm, Retriever(task), user, pqs, cfg)
        out["adapter"] += [g for g in labels.adapter_examples(task, llm, Retriever(task), user, pqs, cfg, None)
                           if not g.held_out]
    return out


def warm_model(cfg, examples: list):
    """A fresh reranker whose frozen-feature cache already holds every pair (as from the second epoch on)."""
    model = hydra.HydraModels.new(cfg).reranker
    with torch.no_grad():
        for e in examples:
            model.encode([e.query], [e.text])
    return model


def time_per_step(cfg, examples: list) -> dict[str, float]:
    """Seconds per step and per row, plain train_stage vs DP-SGD, one epoch each over the same examples, warm cache."""
    model = warm_model(cfg, examples)
    plain = train_stage(model, examples, epochs=1, lr=cfg.lr, head_lr=cfg.head_lr, batch_size=cfg.batch_size,
                        progress=False)
    model = warm_model(cfg, examples)
    dp = DPSettings("record", 0.0, 1.0, 1.0, 1e-5, 0.0, 1)
    with tempfile.TemporaryDirectory() as folder:
        report = train_record_dp(model, examples, PrivacyLedger.load(Path(folder) / "p.json"), dp,
                                 module="reranker", server_round=1, epochs=1, lr=cfg.lr, head_lr=cfg.head_lr,
                                 batch_size=cfg.batch_size)
    rows_per_unit = statistics.fmean(u.rows for u in privacy_units(examples))
    dp_rows = report["sampled_units"] * rows_per_unit
    return {"plain_s_per_step": plain["seconds"] / plain["steps"],
            "plain_rows_per_step": len(examples) / plain["steps"],
            "plain_ms_per_row": 1000 * plain["seconds"] / len(examples),
            "dp_s_per_step": report["seconds"] / report["steps"], "dp_rows_per_step": dp_rows / report["steps"],
            "dp_ms_per_row": 1000 * report["seconds"] / max(dp_rows, 1)}


def privacy_figures(cfg, examples: dict[str, list], dp: DPSettings) -> list[dict]:
    """Every planned round of one client, reranker then adapter, as the federation runs them."""
    models, rows = hydra.HydraModels.new(cfg), []
    with tempfile.TemporaryDirectory() as folder:
        ledger = PrivacyLedger.load(Path(folder) / "privacy.json")
        for i, module in enumerate(hydra.MODULES):
            for r in range(1, dp.rounds + 1):
                report = train_record_dp(getattr(models, module), examples[module], ledger, dp, module=module,
                                         server_round=i * dp.rounds + r, **hydra.optim_args(cfg))
                rows.append({"round": i * dp.rounds + r, "module": module, "units": report["units"],
                             "K": report["item_units"], "steps": report["steps"],
                             "sample_rate": report["plan"].sample_rate, "z": report["plan"].noise_multiplier,
                             "epsilon": report["epsilon"], "item_epsilon": report["item_epsilon"],
                             "seconds": report["seconds"], "exhausted": report["exhausted"]})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1, help="users on the client (1: FedHydra's default)")
    ap.add_argument("--rounds", type=int, default=3, help="planned rounds per module")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timing-users", type=int, default=4, help="users whose reranker examples time the steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_config("cpu")
    timing = time_per_step(cfg, client_examples(cfg, args.timing_users, seed=1)["reranker"])
    print(json.dumps({"timing": timing}), flush=True)
    examples = client_examples(cfg, args.users, seed=0)
    for module, ex in examples.items():
        print(f"{module}: {len(privacy_units(ex))} units, K = {item_units(privacy_units(ex))}", flush=True)
    dp = DPSettings("record", args.epsilon, 0.0, 1.0, args.delta, 0.0, args.rounds)
    rows = privacy_figures(cfg, examples, dp)
    print("| round | module | units | K | steps | q | z | epsilon (unit) | epsilon (item) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['module']} | {r['units']} | {r['K']} | {r['steps']} | {r['sample_rate']:.3f} | "
              f"{r['z']:.3f} | {r['epsilon']:.3f} | {r['item_epsilon']:.1f} |")


if __name__ == "__main__":
    main()
