"""`fedhydra simulate` (and `fedhydra demo`): the FedHydra Flower app on Flower's simulation runtime,
beside the methods it must beat, on the same unseen test users.

- zero-shot, rag-K:  prompt baselines (one greedy LLM call per query);
- hydra:             centralized HYDRA, trained on all train users' data in one place;
- hydra-fed:         FedHydra through Flower's own CLI: a local SuperLink in simulation mode and
                     `flwr run` of the app with these settings; train clients train the shared bases with
                     the chosen Flower strategy, test clients fit their heads locally and report only
                     metric statistics;
- hydra-local:       each test client alone: base and heads trained on its own users' history only;
- copy-input, mbr, closest, oracle: references on the same users (simulations/compare.py).
Train users and test users are disjoint; each simulated client makes its own private state folder under
OUT/clients from its partition. The LLM answers land in one response cache (cache-dir) that stands for
the LLM provider, read through by every client's own cache, so identical prompts are answered once.
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

from fedhydra.common.config import HydraConfig
from fedhydra.common.llm import default_cache_dir, llm_from_settings
from fedhydra.common.partition import federated_split, load_users
from fedhydra.common.prompts import default_style
from fedhydra.common.tasks import Task
from fedhydra.server.privacy_statement import markdown_lines

from .compare import PROMPT_BASELINES, REFERENCES, llm_candidates, ratios, references, run_baselines, run_method
from .app_folder import CLIENTAPP, write_app
from .deployment import Deployment
from .results import MethodResult, markdown_table, write_results

FEDERATED = ("hydra", "hydra-local", "hydra-fed")


def run_federated(values: dict, out: Path, parallel: int = 0, clientapp: str = CLIENTAPP,
                  files: dict[str, str] | None = None, echo=print) -> dict:
    """`flwr run` of the app on a local simulation SuperLink with one virtual node per client; returns federated.json."""
    import torch

    n = int(values["clients"]) + int(values["test-clients"])
    cores = os.cpu_count() or 1
    parallel = max(1, min(parallel or cores, n))
    threads = max(1, cores // parallel)  # each client runs its LLM and torch on its share of the cores
    fed = values | {"out": str(out / "federated"), "state-root": str(out / "clients"), "min-nodes": n,
                    "threads": threads, "llm-threads": threads}
    if fed["resume"]:  # refuse a resume under other settings here, before starting anything
        from fedhydra.server import checkpoint

        checkpoint.load(Path(fed["out"]) / "checkpoint", checkpoint.fingerprint(fed))
    app = write_app(out / "flower" / "app", fed, clientapp=clientapp, files=files)
    options = {"num-supernodes": n, "client-resources-num-cpus": threads, "init-args-num-cpus": cores}
    if torch.cuda.is_available():
        options |= {"client-resources-num-gpus": torch.cuda.device_count() / parallel,
                    "init-args-num-gpus": torch.cuda.device_count()}
    if values["ray-address"]:  # an existing cluster brings its own resources (Ray refuses them when joining)
        options = {k: v for k, v in options.items() if not k.startswith("init-args-")}
    with Deployment(out / "flower", simulation=True, log=echo, ray_address=values["ray-address"]) as deployment:
        deployment.start_superlink()
        info = deployment.run(app, echo=echo, federation_config=options)
    path = out / "federated" / "federated.json"
    if info.get("status") != "finished:completed" or not path.is_file():
        raise RuntimeError(f"the federated run ended with status {info.get('status')}; "
                           f"see {deployment.logs / 'flwr-run.log'}")
    return json.loads(path.read_text(encoding="utf-8"))


def fed_result(task: Task, doc: dict, wall: float) -> MethodResult:
    ev = doc["evaluation"]
    calls = ev["llm_calls"] + sum(r["llm_calls"] for r in doc["rounds"])
    tokens = ev["tokens"] + sum(r["tokens"] for r in doc["rounds"])
    hits = ev["cache_hits"] + sum(r["cache_hits"] for r in doc["rounds"])
    return MethodResult("hydra-fed", {m: ev["metrics"][m] for m in task.metrics}, ev["users"], calls, tokens, hits,
                        round(wall, 2))


def run_local(task: Task, llm, groups: list, cfg: HydraConfig):
    """hydra-local: every test client trains its own base and heads on its own users' history only."""
    from fedhydra.common.hydra import HydraModels, resolve_margin, train
    from fedhydra.common.pipeline import HydraPipeline
    from fedhydra.common.retrieval import Retriever

    answers, users = {}, []
    before, t0 = llm.stats.copy(), time.perf_counter()
    for i, group in enumerate(groups, 1):
        models = HydraModels.new(cfg)  # one client's models at a time: answer, then let them go
        report = train(task, llm, group, cfg, models)
        margin = resolve_margin(cfg, report.get("calibration", {}).get("margin", "off"))
        pipe = HydraPipeline(task, llm, Retriever(task), models.reranker, models.adapter, cfg, margin)
        answers |= {u.id: pipe.answer(u, "full") for u in group}
        users += group
        print(f"hydra-local: client {i}/{len(groups)} done", flush=True)
    result, rows = run_method("hydra-local", task, users, lambda u: answers[u.id], llm, progress=False)
    used = llm.stats.minus(before)
    result.llm_calls, result.tokens, result.cache_hits = used.calls, used.tokens, used.cache_hits
    result.wall_s = round(time.perf_counter() - t0, 2)
    return result, rows


def simulate_command(args: argparse.Namespace, values: dict, demo: bool = False, clientapp: str = CLIENTAPP,
                     files: dict[str, str] | None = None) -> Path:
    """Everything `fedhydra simulate` and `fedhydra demo` do; `clientapp` / `files`: the ClientApp component
    to run and extra files for the app folder (tests wrap FedHydra's ClientApp with a recording mod)."""
    from .evaluate import check_methods, run_hydra

    t0 = time.perf_counter()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    check_methods(methods, extra=FEDERATED)
    out = Path(args.out).expanduser().resolve()
    split = load_users(values)
    task = split.task
    parts = federated_split(split, values)
    test_groups = [users for role, users in parts if role == "test"]
    train_users = [u for role, users in parts if role == "train" for u in users]
    test_users = [u for group in test_groups for u in group]
    if not test_users:
        raise ValueError("--test-clients must be at least 1: the methods are compared on the test clients' users")
    values = values | {"cache-dir": str(default_cache_dir(values["cache-dir"] or None).resolve()),
                       "task": task.name}
    cfg = HydraConfig.from_settings(values)
    # centralized and local HYDRA train as long as a federated client: rounds x epochs per round
    central = replace(cfg, epochs=values["rounds"] * cfg.epochs)
    llm = llm_from_settings(values)
    print(f"FedHydra {'demo' if demo else 'simulate'}: {task.name}, {len(parts)} clients ({values['clients']} train, "
          f"{values['test-clients']} test, {values['users-per-client']} user(s) each), strategy {values['strategy']}, "
          f"{values['rounds']} rounds per module, LLM {llm.name}, preset {cfg.preset}", flush=True)

    results, predictions, extra = [], {}, {"config": cfg.as_dict(), "settings": values}
    baselines = [m for m in methods if m.startswith(PROMPT_BASELINES)]
    if baselines:
        r, p = run_baselines(task, test_users, baselines, llm, seed=cfg.seed, style=cfg.style_or_none)
        results += r
        predictions |= p
    if "hydra" in methods:
        r, p, report, _ = run_hydra(task, llm, train_users, test_users, ["hydra"], central)
        results += r
        predictions |= p
        extra["hydra training"] = report
    if "hydra-local" in methods:
        r, rows = run_local(task, llm, test_groups, central)
        results.append(r)
        predictions["hydra-local"] = rows
    refs = [m for m in methods if m in REFERENCES]
    if refs:
        r, p = references(task, test_users, refs, llm_candidates(predictions.get("hydra", [])))
        results += r
        predictions |= p
    if "hydra-fed" in methods:
        print("federated run (Flower's simulation runtime, flwr run):", flush=True)
        t1 = time.perf_counter()
        doc = run_federated(values, out, args.parallel, clientapp, files)
        extra["federated"] = doc
        if doc["status"] == "done":
            results.append(fed_result(task, doc, time.perf_counter() - t1))
            from .plots import plot_rounds

            plot_rounds(doc["rounds"], out, f"{task.name}, {len(parts)} clients")
        elif doc["status"].startswith("stopped after"):
            print(f"federated run {doc['status']}; rerun with --resume true to finish it", flush=True)
        else:
            print(f"federated run ended: {doc['status']}", flush=True)
    order = {m: i for i, m in enumerate(methods)}
    results.sort(key=lambda r: order.get(r.method, len(order)))
    info = {"data": values["data"] or "synthetic", "clients": f"{values['clients']} train + {values['test-clients']} "
            f"test, {values['users-per-client']} user(s) each, partitioner {values['partitioner']}",
            "strategy": values["strategy"], "rounds per module": values["rounds"], "epochs per round": cfg.epochs,
            "seed": cfg.seed, "llm": llm.name, "prompt style": cfg.style or default_style(task), "preset": cfg.preset,
            "machine": f"{platform.machine()}, Python {platform.python_version()}",
            "wall s": round(time.perf_counter() - t0, 1),
            "peak RSS MB (driver)": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    rounds = extra.get("federated", {}).get("rounds")
    if rounds:
        info["MB per client per round, down / up (max)"] = (
            f"{max(b['down'] for r in rounds for b in r['bytes'].values()) / 1e6:.2f} / "
            f"{max(b['up'] for r in rounds for b in r['bytes'].values()) / 1e6:.2f}")
        info["round s (mean)"] = round(sum(r["seconds"] for r in rounds) / len(rounds), 1)
        info["adapter margin (federated)"] = extra["federated"].get("margin")
    q = ratios(task, predictions, seed=cfg.seed)
    fed = next((r for r in results if r.method == "hydra-fed"), None)
    if q and fed:  # hydra-fed's clients return metric sums, not per-user answers: a point ratio only
        base = next(iter(q.values()))["baseline"]
        b, f = next(r for r in results if r.method == base).metrics[task.metrics[0]], fed.metrics[task.metrics[0]]
        num, den = (f, b) if task.higher_is_better else (b, f)
        q["hydra-fed"] = {"ratio": round(num / den, 4) if den else float("nan"), "low": None, "high": None,
                          "baseline": base}
    privacy = extra.get("federated", {}).get("privacy")
    appendix = "\n".join(markdown_lines(privacy)) if privacy else ""
    md = write_results(out, task, results, info, predictions, extra=extra, ratios=q, appendix=appendix)
    print("\n" + markdown_table(task, results, q) + f"\n\nresults: {md}")
    return out
