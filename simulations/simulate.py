"""`fedhydra simulate`: a federated run on Flower's simulation runtime, beside the methods it must beat.

On the same unseen test users it runs:
- zero-shot, rag-K:  prompt baselines (one greedy LLM call per query);
- hydra:             centralized HYDRA, trained on all train users' data in one place;
- hydra-fed:         FedHydra on Flower: train clients average their shared bases, test clients
                     fit their heads locally and report only metric statistics;
- hydra-local:       each test client alone: base and heads trained on its own users' history only.
Train users and test users are disjoint; each client gets a private state folder under OUT/clients.
The LLM answers land in one response cache (--cache-dir) that stands for the LLM provider, read
through by every client's own cache, so identical prompts are answered once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from dataclasses import replace
from pathlib import Path

from fedhydra.common.data import load_split, split_users
from fedhydra.common.llm import default_cache_dir
from fedhydra.common.prompts import default_style
from fedhydra.common.tasks import Task

from .compare import run_baselines, run_method
from .partition import PARTITIONERS, ClientSpec, prepare_clients
from .results import MethodResult, markdown_table, write_results

METHODS = ("zero-shot", "rag-4", "hydra", "hydra-local", "hydra-fed")


def add_simulate_command(sub) -> None:
    from fedhydra.common.cli import add_llm_options

    p = sub.add_parser("simulate", help="federated HYDRA on Flower's simulation runtime, beside the baselines",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=None, help="expected task (default: from the data)")
    p.add_argument("--data", required=True, help="a LaMP split folder; its users are divided into clients")
    p.add_argument("--clients", type=int, default=10, help="train clients (default 10)")
    p.add_argument("--test-clients", type=int, default=5, help="clients of unseen users, evaluated (default 5)")
    p.add_argument("--users-per-client", type=int, default=1, help="users each client holds (default 1)")
    p.add_argument("--partitioner", choices=PARTITIONERS, default="id",
                   help="id: users dealt out at random; profile-size: clients of similar history length")
    p.add_argument("--rounds", type=int, default=3, help="FedAvg rounds per module (reranker, then adapter)")
    p.add_argument("--local-epochs", type=int, default=1, help="epochs a client trains per round")
    p.add_argument("--clients-per-round", type=int, default=0, help="train clients sampled per round (0 = all)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}"
                                                                " (rag-K for any K)")
    p.add_argument("--preset", default="cpu", choices=("cpu", "paper"), help="HYDRA sizes (default cpu)")
    p.add_argument("--pseudo-queries", type=int, default=0, help="override the preset's pseudo-queries per user")
    p.add_argument("--retrieve", type=int, default=0, help="override the preset's M (items BM25 gives the reranker)")
    p.add_argument("--k", type=int, default=0, help="override the preset's k (items in the prompt)")
    p.add_argument("--candidates", type=int, default=0, help="override the preset's B")
    p.add_argument("--train-layers", type=int, default=0, help="override the trainable (shared) top encoder layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", type=int, default=0,
                   help="clients trained at once (default: one per CPU core; each loads its own LLM and encoders)")
    p.add_argument("--out", required=True, help="results folder (clients' private states go in OUT/clients)")
    p.add_argument("--resume", action="store_true", help="continue the federated run from OUT's last checkpoint")
    p.add_argument("--stop-after-round", type=int, default=0, help="stop the federated run after this round")
    add_llm_options(p)
    p.set_defaults(func=simulate_command)


def fed_settings(args: argparse.Namespace, task: Task, out: Path, cache_dir: Path) -> dict:
    """The run config the ServerApp and the ClientApps get (server/settings.py)."""
    return {"task": task.name, "rounds": args.rounds, "local-epochs": args.local_epochs,
            "clients-per-round": args.clients_per_round, "min-nodes": 1, "preset": args.preset,
            "pseudo-queries": args.pseudo_queries, "retrieve": args.retrieve, "k": args.k,
            "candidates": args.candidates, "train-layers": args.train_layers, "seed": args.seed,
            "llm": args.llm, "llm-base-url": args.llm_base_url or "", "llm-model": args.llm_model or "",
            "out": str(out / "federated"), "resume": args.resume, "stop-after-round": args.stop_after_round,
            "state-root": str((out / "clients").resolve()), "llm-shared-cache": str(cache_dir.resolve())}


def run_federated(specs: list[ClientSpec], settings: dict, parallel: int) -> dict:
    """Flower's simulation runtime (Ray): one virtual SuperNode per client; returns federated.json."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import torch
    from flwr.simulation import run_simulation

    from fedhydra.client.client_app import make_client_app
    from fedhydra.server.server_app import make_server_app

    cores = os.cpu_count() or 1
    parallel = max(1, min(parallel or cores, len(specs)))
    gpus = (torch.cuda.device_count() / parallel) if torch.cuda.is_available() else 0.0
    # Each client process runs its LLM and torch on its own core: threads = cores / parallel.
    threads = max(1, cores // parallel)
    client_defaults = {k: settings[k] for k in ("state-root", "llm", "llm-base-url", "llm-model", "llm-shared-cache")}
    client_defaults |= {"llm-threads": threads, "threads": threads}
    server_defaults = {k: v for k, v in settings.items() if k not in ("state-root", "llm-shared-cache")}
    backend = {"client_resources": {"num_cpus": cores / parallel, "num_gpus": gpus},
               "init_args": {"num_cpus": cores, "num_gpus": torch.cuda.device_count(), "log_to_driver": True}}
    run_simulation(make_server_app(server_defaults), make_client_app(client_defaults), num_supernodes=len(specs),
                   backend_config=backend)
    path = Path(settings["out"]) / "federated.json"
    if not path.is_file():
        raise RuntimeError(f"the federated run wrote no {path}; see the log above")
    return json.loads(path.read_text(encoding="utf-8"))


def fed_result(task: Task, doc: dict, wall: float) -> MethodResult:
    ev = doc["evaluation"]
    calls = ev["llm_calls"] + sum(r["llm_calls"] for r in doc["rounds"])
    tokens = ev["tokens"] + sum(r["tokens"] for r in doc["rounds"])
    hits = ev["cache_hits"] + sum(r["cache_hits"] for r in doc["rounds"])
    return MethodResult("hydra-fed", {m: ev["metrics"][m] for m in task.metrics}, ev["users"], calls, tokens, hits,
                        round(wall, 2))


def run_local(task: Task, llm, specs: list[ClientSpec], cfg, progress: bool = True):
    """hydra-local: every test client trains its own base and heads on its own users' history only."""
    from tqdm import tqdm

    from fedhydra.client.state import ClientState
    from fedhydra.common.hydra import HydraModels, train
    from fedhydra.common.pipeline import HydraPipeline
    from fedhydra.common.retrieval import Retriever

    answers, users = {}, []
    before, t0 = llm.stats.copy(), time.perf_counter()
    for spec in tqdm(specs, desc="hydra-local clients", unit="client", disable=not progress):
        group = ClientState(spec.state).users("test")
        models = HydraModels.new(cfg)  # one client's models at a time: answer, then let them go
        train(task, llm, group, cfg, models, progress=False)
        pipe = HydraPipeline(task, llm, Retriever(task), models.reranker, models.adapter, cfg)
        answers |= {u.id: pipe.answer(u, "full") for u in group}
        users += group
    result, rows = run_method("hydra-local", task, users, lambda u: answers[u.id], llm, progress=False)
    used = llm.stats.minus(before)
    result.llm_calls, result.tokens, result.cache_hits = used.calls, used.tokens, used.cache_hits
    result.wall_s = round(time.perf_counter() - t0, 2)
    return result, rows


def simulate_command(args: argparse.Namespace) -> Path:
    from fedhydra.common.cli import llm_from_args
    from fedhydra.server.settings import FedSettings

    from .evaluate import best_prompt_ratio, run_hydra

    t0 = time.perf_counter()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS and not m.startswith("rag-") and m != "zero-shot"]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)} (rag-K for any K)")
    if args.clients < 1 or args.test_clients < 1:
        raise ValueError(f"--clients ({args.clients}) and --test-clients ({args.test_clients}) must be at least 1")
    split = load_split(args.data)
    task = split.task
    if args.task and args.task != task.name:
        raise ValueError(f"--task {args.task} but the data is {task.name}")
    k = args.users_per_client
    train_users, test_users = split_users(split.users, args.clients * k, args.test_clients * k, args.seed)
    out = Path(args.out)
    specs = prepare_clients(out / "clients", task, train_users, test_users, k, args.partitioner, args.seed)
    cache_dir = default_cache_dir(args.cache_dir)
    settings = fed_settings(args, task, out, cache_dir)
    fed = FedSettings.from_config({}, {k: v for k, v in settings.items() if k not in ("state-root", "llm-shared-cache")})
    # centralized and local HYDRA train as long as a federated client: rounds x local epochs
    cfg = replace(fed.hydra, epochs=args.rounds * args.local_epochs)
    llm = llm_from_args(args)
    print(f"FedHydra simulate: {task.name}, {len(specs)} clients ({args.clients} train, {args.test_clients} test, "
          f"{k} user(s) each), {args.rounds} rounds per module, LLM {llm.name}, preset {cfg.preset}", flush=True)

    results, predictions, extra = [], {}, {"config": cfg.as_dict(), "simulation": settings}
    baselines = [m for m in methods if m == "zero-shot" or m.startswith("rag-")]
    if baselines:
        r, p = run_baselines(task, test_users, baselines, llm, seed=args.seed)
        results += r
        predictions |= p
    if "hydra" in methods:
        r, p, report, _ = run_hydra(task, llm, train_users, test_users, ["hydra"], cfg)
        results += r
        predictions |= p
        extra["hydra training"] = report
    if "hydra-local" in methods:
        r, rows = run_local(task, llm, [s for s in specs if s.role == "test"], cfg)
        results.append(r)
        predictions["hydra-local"] = rows
    if "hydra-fed" in methods:
        print("federated run (Flower simulation runtime):", flush=True)
        t1 = time.perf_counter()
        doc = run_federated(specs, settings, args.parallel)
        extra["federated"] = doc
        if doc["status"] == "done":
            results.append(fed_result(task, doc, time.perf_counter() - t1))
            from .plots import plot_rounds

            plot_rounds(doc["rounds"], out, f"{task.name}, {len(specs)} clients")
        else:
            print(f"federated run {doc['status']}; rerun with --resume to finish it", flush=True)
    order = {m: i for i, m in enumerate(methods)}
    results.sort(key=lambda r: order.get(r.method, len(order)))
    info = {"data": str(args.data), "clients": f"{args.clients} train + {args.test_clients} test, {k} user(s) each, "
            f"partitioner {args.partitioner}", "rounds per module": args.rounds, "local epochs": args.local_epochs,
            "seed": args.seed, "llm": llm.name, "prompt style": cfg.style or default_style(task),
            "preset": cfg.preset, "machine": f"{platform.machine()}, Python {platform.python_version()}",
            "wall s": round(time.perf_counter() - t0, 1),
            "peak RSS MB (driver)": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if "federated" in extra and extra["federated"]["rounds"]:
        rounds = extra["federated"]["rounds"]
        info["upload MB per client per round (max)"] = round(max(b["up"] for r in rounds for b in r["bytes"].values()) / 1e6, 2)
        info["round s (mean)"] = round(sum(r["seconds"] for r in rounds) / len(rounds), 1)
    ratio = best_prompt_ratio(task, [replace(r, method="hydra") if r.method == "hydra-fed" else r
                                     for r in results if r.method != "hydra"])
    if ratio is not None:
        info["hydra-fed / best prompt baseline"] = round(ratio, 4)
    md = write_results(out, task, results, info, predictions, extra=extra)
    print("\n" + markdown_table(task, results) + f"\n\nresults: {md}")
    return out
