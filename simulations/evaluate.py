"""`fedhydra evaluate`: centralized comparison of the prompt baselines and HYDRA on the same test users.

HYDRA methods share one train stage (on the train users) and one fit stage (on the test
users' history); their cost is reported once, under "hydra training" in results.json.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path

from fedhydra.common.config import HydraConfig, get_config
from fedhydra.common.data import load_split, split_users
from fedhydra.common.hydra import HydraModels, fit, train
from fedhydra.common.llm.base import LLM
from fedhydra.common.pipeline import MODES, HydraPipeline
from fedhydra.common.prompts import default_style
from fedhydra.common.records import User
from fedhydra.common.retrieval import Retriever
from fedhydra.common.tasks import Task

from .compare import run_baselines, run_method
from .results import MethodResult, markdown_table, write_results

BASELINE_PREFIXES = ("zero-shot", "rag-", "icl-random-")


def check_methods(methods: list[str]) -> None:
    for m in methods:
        if m not in MODES and not m.startswith(BASELINE_PREFIXES):
            raise ValueError(f"unknown method {m!r}; methods: zero-shot, rag-K, icl-random-K, {', '.join(MODES)}")


def run_hydra(task: Task, llm: LLM, train_users: list[User], test_users: list[User], methods: list[str],
              cfg: HydraConfig, encoder: str | None = None, progress: bool = True):
    """Train on `train_users`, fit on `test_users`, answer with each HYDRA variant in `methods`."""
    before, t0 = llm.stats.copy(), time.perf_counter()
    models = HydraModels.new(cfg, encoder)
    report = {"train": train(task, llm, train_users, cfg, models, progress),
              "fit": fit(task, llm, test_users, cfg, models, progress)}
    used = llm.stats.minus(before)
    report |= {"llm_calls": used.calls, "tokens": used.tokens, "cache_hits": used.cache_hits,
               "wall_s": round(time.perf_counter() - t0, 2)}
    pipe = HydraPipeline(task, llm, Retriever(task), models.reranker, models.adapter, cfg)
    results, predictions = [], {}
    for name in methods:
        r, rows = run_method(name, task, test_users, lambda u, mode=MODES[name]: pipe.answer(u, mode), llm, progress)
        results.append(r)
        predictions[name] = rows
    return results, predictions, report, models


def _check_task(expected: str | None, task: Task) -> None:
    if expected and expected != task.name:
        raise ValueError(f"--task {expected} but the data is {task.name}")


def evaluate_command(args: argparse.Namespace) -> Path:
    """Everything `fedhydra evaluate` does; see its --help."""
    from fedhydra.common.cli import llm_from_args

    t0 = time.perf_counter()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    check_methods(methods)
    cfg = get_config(args.preset, seed=args.seed, pseudo_queries=args.pseudo_queries, retrieve=args.retrieve,
                     k=args.k, candidates=args.candidates, style=args.style, epochs=args.epochs,
                     adapter_generation_labels=args.adapter_labels)
    if args.data:
        split = load_split(args.data)
        _check_task(args.task, split.task)
        train_users, test_users = split_users(split.users, args.train_users, args.test_users, args.seed)
        task, source = split.task, str(args.data)
    else:
        if not (args.train_data and args.test_data):
            raise ValueError("give --data DIR, or both --train-data DIR and --test-data DIR")
        tr, te = load_split(args.train_data), load_split(args.test_data)
        _check_task(args.task, tr.task)
        if tr.task.name != te.task.name:
            raise ValueError(f"--train-data is {tr.task.name} but --test-data is {te.task.name}")
        train_users, _ = split_users(tr.users, args.train_users, 0, args.seed)
        _, test_users = split_users(te.users, 0, args.test_users, args.seed)
        task, source = tr.task, f"train {args.train_data}, test {args.test_data}"
    llm = llm_from_args(args)
    print(f"{task.name}: {len(train_users)} train users, {len(test_users)} test users, LLM {llm.name}, "
          f"preset {cfg.preset}", flush=True)

    baselines = [m for m in methods if m not in MODES]
    results, predictions = run_baselines(task, test_users, baselines, llm, seed=args.seed,
                                         style=cfg.style) if baselines else ([], {})
    info = {"data": source, "train users": len(train_users), "test users": len(test_users), "seed": args.seed,
            "llm": llm.name, "prompt style": cfg.style or default_style(task), "preset": cfg.preset,
            "machine": f"{platform.machine()}, Python {platform.python_version()}"}
    hydra = [m for m in methods if m in MODES]
    extra: dict = {"config": cfg.as_dict()}
    if hydra:
        r, p, report, _ = run_hydra(task, llm, train_users, test_users, hydra, cfg, args.encoder)
        results += r
        predictions |= p
        extra["hydra training"] = report
        info["hydra train+fit s"] = report["wall_s"]
    info["wall s"] = round(time.perf_counter() - t0, 1)
    info["peak RSS MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    order = {m: i for i, m in enumerate(methods)}
    results.sort(key=lambda r: order[r.method])
    ratio = best_prompt_ratio(task, results)
    if ratio is not None:
        info["hydra / best prompt baseline"] = round(ratio, 4)
    out = Path(args.out)
    md = write_results(out, task, results, info, predictions, extra=extra)
    print("\n" + markdown_table(task, results) + f"\n\nresults: {md}")
    return out


def best_prompt_ratio(task: Task, results: list[MethodResult]) -> float | None:
    """hydra's first metric over the best prompt baseline's (max of zero-shot and rag-K; MAE: inverted)."""
    by = {r.method: r.metrics[task.metrics[0]] for r in results}
    base = [v for m, v in by.items() if m == "zero-shot" or m.startswith("rag-")]
    if "hydra" not in by or not base:
        return None
    if task.higher_is_better:
        best = max(base)
        return by["hydra"] / best if best else None
    best = min(base)
    return best / by["hydra"] if by["hydra"] else None
