"""`fedhydra simulate` (and `fedhydra demo`): the FedHydra Flower app on Flower's simulation runtime,
beside the methods it must beat, on the same unseen test users.

- zero-shot, rag-K:  prompt baselines (one greedy LLM call per query);
- hydra:             centralized HYDRA, trained on all train users' data in one place;
- hydra-fed:         FedHydra through Flower's own CLI: a local SuperLink in simulation mode and
                     `flwr run` of the app with these settings; train clients train the shared bases with
                     the chosen Flower strategy, test clients fit their heads locally and report only
                     metric statistics (their answers stay in their state folders, where this harness,
                     the owner of every simulated device, reads them for paired intervals);
- hydra-local:       each test client alone: base and heads trained on its own users' history only;
- copy-input, first-words, majority-label, user-mean, user-mode, mbr, closest, oracle: references on the same
  users (simulations/compare.py).
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

from fedhydra.client.state import ClientState, StateError, check_origin, partition_origin
from fedhydra.common import settings
from fedhydra.common.config import HydraConfig
from fedhydra.common.data import dataset_name
from fedhydra.common.llm import default_cache_dir, llm_from_settings
from fedhydra.common.partition import federated_split, load_users
from fedhydra.common.pipeline import MODES
from fedhydra.common.prompts import default_style
from fedhydra.common.protocol import FULL
from fedhydra.common.tasks import Task
from fedhydra.server.privacy_statement import markdown_lines

from .app_folder import CLIENTAPP, write_app
from .compare import (PROMPT_BASELINES, REFERENCES, check_references, paired_ratio, ratios, run_baselines,
                      run_method, run_references)
from .deployment import Deployment
from .results import MethodResult, Outcomes, markdown_table, write_results

FEDERATED = ("hydra-local", "hydra-fed")  # besides the centralized methods evaluate runs too


def federated_plan(values: dict, out: Path, parallel: int = 0, given: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """The Flower run's settings and the simulation runtime's options, decided before anything starts.

    Every simulated client gets an equal share of the cores for torch and the LLM (threads, llm-threads), unless
    the user gave those flags (`given`): an explicit flag always wins. The choice is printed by run_federated.
    """
    import torch

    n = int(values["clients"]) + int(values["test-clients"])
    cores = os.cpu_count() or 1
    parallel = max(1, min(parallel or cores, n))
    share = max(1, cores // parallel)
    fed = values | {"out": str(out / "federated"), "state-root": str(out / "clients"), "min-nodes": n}
    fed |= {k: share for k in ("threads", "llm-threads") if k not in given}
    options = {"num-supernodes": n, "client-resources-num-cpus": share, "init-args-num-cpus": cores}
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        options |= {"client-resources-num-gpus": gpus / parallel, "init-args-num-gpus": gpus}
    if values.get("ray-address"):  # an existing cluster brings its own resources (Ray refuses them when joining)
        options = {k: v for k, v in options.items() if not k.startswith("init-args-")}
    return fed, options


def oversubscription(fed: dict, options: dict) -> str:
    """A warning (or "") when the clients that run at once ask for more threads than this machine has cores.
    llama.cpp's idle threads spin instead of sleeping, so oversubscribed clients slow each other down: on 2 cores,
    2 clients with llm-threads 2 made 0.4 LLM requests/s together, with the automatic share (llm-threads 1)
    0.7 to 0.9/s, on the same kind of reranker-label prompts."""
    share = options.get("client-resources-num-cpus")
    cores = options.get("init-args-num-cpus")
    if not share or not cores:  # a Ray cluster brings its own resources: its cores are not this machine's
        return ""
    at_once = max(1, min(int(fed["min-nodes"]), int(cores // share)))
    threads = max(int(fed["threads"]), int(fed["llm-threads"]))
    if at_once * threads <= cores:
        return ""
    return (f"warning: {at_once} client(s) at once x {threads} threads each on {cores} cores: the LLM's threads spin "
            "while they wait, so the run slows down (about 2x on 2 cores); leave out --threads/--llm-threads for the "
            "automatic share, or lower --parallel")


def check_federated_start(fed: dict) -> None:
    """Refuse at once what the Flower run would refuse later: a resume under other settings, and a state root that
    holds another run's clients (each client would refuse its folder, after the baselines had run)."""
    if fed["resume"]:
        from fedhydra.server import checkpoint

        checkpoint.load(Path(fed["out"]) / "checkpoint", checkpoint.fingerprint(fed))
    root = Path(fed["state-root"])
    for pid in range(int(fed["clients"]) + int(fed["test-clients"])):
        folder = root / f"client-{pid}"
        if (folder / "client.json").is_file():
            check_origin(folder, ClientState(folder).origin, partition_origin(fed, pid))


def run_federated(values: dict, out: Path, parallel: int = 0, clientapp: str = CLIENTAPP,
                  files: dict[str, str] | None = None, echo=print, given: tuple[str, ...] = ()) -> dict:
    """`flwr run` of the app on a local simulation SuperLink with one virtual node per client; returns federated.json."""
    fed, options = federated_plan(values, out, parallel, given)
    echo(f"{options['num-supernodes']} simulated clients, {options['client-resources-num-cpus']} CPU(s) each; "
         f"threads {fed['threads']}, llm-threads {fed['llm-threads']}"
         f"{'' if {'threads', 'llm-threads'} <= set(given) else ' (automatic share of the cores unless given)'}")
    warning = oversubscription(fed, options)
    if warning:
        echo(warning)
    check_federated_start(fed)
    app = write_app(out / "flower" / "app", fed, clientapp=clientapp, files=files)
    with Deployment(out / "flower", simulation=True, log=echo, ray_address=fed.get("ray-address", "")) as deployment:
        deployment.start_superlink()
        info = deployment.run(app, echo=echo, federation_config=options)
    path = out / "federated" / "federated.json"
    if info.get("status") != "finished:completed" or not path.is_file():
        raise RuntimeError(f"the federated run ended with status {info.get('status')}"
                           f"{client_error(deployment.logs / 'flwr-run.log')}; see {deployment.logs / 'flwr-run.log'}")
    return json.loads(path.read_text(encoding="utf-8"))


def client_error(log: Path) -> str:
    """': <the first ClientApp error>' from a run's log, or '' (the server's own error names no cause)."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    for line in lines:
        if "Error" in line and ("ClientApp" in line or "fedhydra" in line or "StateError" in line
                                or "DataError" in line):
            return ": " + line.strip()[:400]
    return ""


def fed_result(task: Task, doc: dict, wall: float) -> MethodResult:
    ev = doc["evaluation"]
    calls = ev["llm_calls"] + sum(r["llm_calls"] for r in doc["rounds"])
    tokens = ev["tokens"] + sum(r["tokens"] for r in doc["rounds"])
    hits = ev["cache_hits"] + sum(r["cache_hits"] for r in doc["rounds"])
    return MethodResult("hydra-fed", {m: ev["metrics"][m] for m in task.metrics}, ev["users"], calls, tokens, hits,
                        round(wall, 2))


def fed_answers(parts: list, state_root: Path, since: float) -> list[dict] | None:
    """hydra-fed's answers per test user, as the simulated test clients keep them in their own state folders (only
    metric sums reach the server): the harness owns every simulated device, so it may read them for paired
    intervals. None unless every test client wrote them in this run (`since`: its start), e.g. when the clients
    ran on other machines of a Ray cluster; then only a point ratio is possible."""
    rows = []
    for pid, (role, users) in enumerate(parts):
        if role != "test":
            continue
        try:
            state = ClientState(state_root / f"client-{pid}")
        except StateError:
            return None
        if not state.answers_path.is_file() or state.answers_path.stat().st_mtime < since:
            return None
        got = state.answers()
        if [r["id"] for r in got] != [u.id for u in users]:
            return None
        rows += got
    return rows


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
        answers |= dict(zip([u.id for u in group], pipe.answer_many(group, FULL)))
        users += group
        print(f"hydra-local: client {i}/{len(groups)} done", flush=True)
    result, rows = run_method("hydra-local", task, users, lambda us: [answers[u.id] for u in us], llm, progress=False)
    used = llm.stats.minus(before)
    result.llm_calls, result.tokens, result.cache_hits = used.calls, used.tokens, used.cache_hits
    result.wall_s = round(time.perf_counter() - t0, 2)
    return result, rows


def simulation_plan(args: argparse.Namespace, values: dict) -> dict:
    """What `fedhydra simulate` will run, decided (and checked) before anything starts: the methods, the folders,
    the users of each role, the centralized config and the Flower run's settings. Every flag lands here."""
    from .evaluate import check_methods

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    check_methods(methods, extra=FEDERATED)
    out = Path(args.out).expanduser().resolve()
    split = load_users(values)
    parts = federated_split(split, values)
    test_groups = [users for role, users in parts if role == "test"]
    if not test_groups:
        raise ValueError("--test-clients must be at least 1: the methods are compared on the test clients' users")
    values = values | {"cache-dir": str(default_cache_dir(values["cache-dir"] or None).resolve()),
                       "task": split.task.name, "data-name": dataset_name(values["data"], split.task, values["data-name"])}
    check_references(split.task, [m for m in methods if m in REFERENCES])
    cfg = HydraConfig.from_settings(values)
    given = tuple(settings.from_args(args))
    fed, options = federated_plan(values, out, args.parallel, given)
    if "hydra-fed" in methods:
        check_federated_start(fed)
    return {"methods": methods, "out": out, "parallel": args.parallel, "task": split.task, "values": values,
            "parts": parts, "test_groups": test_groups, "given": given,
            "train_users": [u for role, users in parts if role == "train" for u in users],
            "test_users": [u for group in test_groups for u in group],
            "config": cfg, "central": replace(cfg, epochs=values["rounds"] * cfg.epochs),  # as long as a client
            "federated": fed, "runtime": options}


def simulate_command(args: argparse.Namespace, values: dict, demo: bool = False, clientapp: str = CLIENTAPP,
                     files: dict[str, str] | None = None) -> Path:
    """Everything `fedhydra simulate` and `fedhydra demo` do; `clientapp` / `files`: the ClientApp component
    to run and extra files for the app folder (tests wrap FedHydra's ClientApp with a recording mod).
    A method that fails does not stop the others; the finished ones' results are written, then the failure
    is reported (results.MethodsFailed)."""
    from .evaluate import run_hydra

    t0 = time.perf_counter()
    plan = simulation_plan(args, values)
    methods, out, task, values, cfg = plan["methods"], plan["out"], plan["task"], plan["values"], plan["config"]
    test_users, parts = plan["test_users"], plan["parts"]
    llm = llm_from_settings(values)
    print(f"FedHydra {'demo' if demo else 'simulate'}: {task.name}, {len(parts)} clients ({values['clients']} train, "
          f"{values['test-clients']} test, {values['users-per-client']} user(s) each), strategy {values['strategy']}, "
          f"{values['rounds']} rounds per module, LLM {llm.name}, preset {cfg.preset}", flush=True)

    done, extra = Outcomes(out), {"config": cfg.as_dict(), "settings": values}
    baselines = [m for m in methods if m.startswith(PROMPT_BASELINES + ("icl-random-",))]
    for name in baselines:
        done.attempt([name], lambda name=name: run_baselines(task, test_users, [name], llm, seed=cfg.seed,
                                                              style=cfg.style_or_none))
    central = [m for m in methods if m in MODES]
    if central:
        def _central():
            r, p, report, _ = run_hydra(task, llm, plan["train_users"], test_users, central, plan["central"])
            extra["hydra training"] = report
            return r, p
        done.attempt(central, _central)
    if "hydra-local" in methods:
        def _local():
            r, rows = run_local(task, llm, plan["test_groups"], plan["central"])
            return [r], {"hydra-local": rows}
        done.attempt(["hydra-local"], _local)
    refs = [m for m in methods if m in REFERENCES]
    run_references(done, task, test_users, refs, plan["train_users"])
    if "hydra-fed" in methods:
        print("federated run (Flower's simulation runtime, flwr run):", flush=True)
        t1, started = time.perf_counter(), time.time()

        def _federated():
            doc = run_federated(values, out, plan["parallel"], clientapp, files, given=plan["given"])
            extra["federated"] = doc
            if doc["status"] == "done":
                from .plots import plot_rounds

                plot_rounds(doc["rounds"], out, f"{task.name}, {len(parts)} clients")
                rows = fed_answers(parts, Path(plan["federated"]["state-root"]), started)
                return [fed_result(task, doc, time.perf_counter() - t1)], {"hydra-fed": rows} if rows else {}
            if doc["status"].startswith("stopped after"):
                print(f"federated run {doc['status']}; rerun with --resume true to finish it", flush=True)
                return [], {}
            raise RuntimeError(f"the federated run ended: {doc['status']}")
        done.attempt(["hydra-fed"], _federated)
    results, predictions = done.results, done.predictions
    order = {m: i for i, m in enumerate(methods)}
    results.sort(key=lambda r: order.get(r.method, len(order)))
    info = {"data set": values["data-name"],
            "data": values["data"] or "synthetic", "clients": f"{values['clients']} train + {values['test-clients']} "
            f"test, {values['users-per-client']} user(s) each, partitioner {values['partitioner']}",
            "strategy": values["strategy"], "rounds per module": values["rounds"], "epochs per round": cfg.epochs,
            "lr schedule": values["lr-schedule"], "seed": cfg.seed, "llm": llm.name,
            "prompt style": cfg.style or default_style(task), "preset": cfg.preset,
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
    if q and fed and "hydra-fed" not in q:  # no answers from the test clients' folders: a point ratio from the sums
        base = next(iter(q.values()))["baseline"]
        b, f = next(r for r in results if r.method == base).metrics[task.metrics[0]], fed.metrics[task.metrics[0]]
        num, den = (f, b) if task.higher_is_better else (b, f)
        q["hydra-fed"] = {"ratio": round(num / den, 4) if den else float("nan"), "low": None, "high": None,
                          "baseline": base}
    if "hydra-fed" in predictions and "hydra" in predictions:  # federated parity, paired over the same users
        par = paired_ratio(task, predictions["hydra-fed"], predictions["hydra"], seed=cfg.seed)
        if par:
            info["hydra-fed over centralized hydra (95% CI)"] = \
                f"{par['ratio']:.3f} ({par['low']:.3f}-{par['high']:.3f}), {par['users']} users, above 1 is better"
    privacy = extra.get("federated", {}).get("privacy")
    appendix = "\n".join(markdown_lines(privacy)) if privacy else ""
    if done.failures:
        extra["failed"] = done.failures
    md = write_results(out, task, results, info, predictions, extra=extra, ratios=q, appendix=appendix)
    print("\n" + markdown_table(task, results, q) + f"\n\nresults: {md}")
    done.raise_failures()
    return out
