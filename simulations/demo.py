"""`fedhydra demo`: the main job, offline: a small federated HYDRA run on synthetic data with the embedded LLM.

Synthetic LaMP-2M users whose tags follow personal habits are dealt out to Flower clients (one
user each): train clients average their shared bases over FedAvg rounds, then test clients of
unseen users fit their own heads and answer their query. The table compares `hydra-fed` with
the prompt baselines on the same test users. Sizes are the cpu preset, shrunk to fit about
10 minutes on 2 cores; `fedhydra simulate` runs the same job at any size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedhydra.common.synthetic import write_synthetic

from .simulate import simulate_command

DEMO_TASK = "LaMP_2M"
DEMO_METHODS = "zero-shot,rag-4,hydra-fed"


def run_demo(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    write_synthetic(out / "data", task=DEMO_TASK, n_users=args.clients + args.test_clients, seed=args.seed)
    sim = argparse.Namespace(
        task=DEMO_TASK, data=str(out / "data"), clients=args.clients, test_clients=args.test_clients,
        users_per_client=1, partitioner="id", rounds=args.rounds, local_epochs=1, clients_per_round=0,
        methods=DEMO_METHODS, preset="cpu", pseudo_queries=2, retrieve=0, k=0, candidates=4, train_layers=0,
        seed=args.seed, parallel=0,
        out=str(out), resume=False, stop_after_round=0, llm=args.llm, llm_base_url=args.llm_base_url,
        llm_model=args.llm_model, llm_threads=args.llm_threads, llm_api_key_env=args.llm_api_key_env, cache_dir=args.cache_dir)
    return simulate_command(sim)
