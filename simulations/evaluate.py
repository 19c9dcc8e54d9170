"""`fedhydra evaluate`: centralized comparison of the prompt baselines, the references and HYDRA on the
same test users, with each method's ratio to the best prompt baseline and its paired bootstrap interval.

HYDRA methods share one train stage (on the train users) and one fit stage (on the test users'
history); their cost is reported once, under "hydra training" in results.json. Every LLM answer is
cached (--cache-dir), so changing a selector or a loss reruns without an LLM call.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path

from fedhydra.common.config import HydraConfig
from fedhydra.common.data import dataset_name, load_split, more_users, split_users
from fedhydra.common.fit import fit_stats
from fedhydra.common.hydra import HydraModels, fit, resolve_margin, train
from fedhydra.common.llm import llm_from_settings
from fedhydra.common.labels import has_label_set_queries
from fedhydra.common.llm.base import LLM
from fedhydra.common.pipeline import MODES, HydraPipeline
from fedhydra.common.prompts import default_style
from fedhydra.common.records import User
from fedhydra.common.retrieval import Retriever
from fedhydra.common.tasks import Task

from .compare import (CANDIDATE_RULES, PROMPT_BASELINES, REFERENCES, check_references, ratios, run_baselines,
                      run_method, run_references)
from .results import Outcomes, markdown_table, write_results


def check_methods(methods: list[str], extra: tuple[str, ...] = ()) -> None:
    for m in methods:
        if m not in MODES and m not in REFERENCES and m not in extra and not m.startswith(PROMPT_BASELINES + ("icl-random-",)):
            raise ValueError(f"unknown method {m!r}; methods: zero-shot, rag-K, icl-random-K, "
                             f"{', '.join(REFERENCES)}, {', '.join(MODES)}{''.join(', ' + e for e in extra)}")


BASE_ONLY = "hydra-base"  # ablation: the full pipeline before the fit stage, bases and default heads for everyone


def run_hydra(task: Task, llm: LLM, train_users: list[User], test_users: list[User], methods: list[str],
              cfg: HydraConfig, say=print, label_users: list[User] = ()):
    """Train on `train_users` (and the adapter's label-set queries of `label_users`), fit on `test_users`, answer
    with each HYDRA variant in `methods` (BASE_ONLY answers between the two stages, so every test user gets the
    default heads: what the per-user heads add is the difference to `hydra`)."""
    before, t0, fitted = llm.stats.copy(), time.perf_counter(), fit_stats(llm).copy()
    models = HydraModels.new(cfg)
    report = {"train": train(task, llm, train_users, cfg, models, say, label_users)}
    margin = resolve_margin(cfg, report["train"].get("calibration", {}).get("margin"))
    report["margin"] = margin
    say(f"adapter margin: {'off (always greedy)' if margin is None else margin}")
    pipe = HydraPipeline(task, llm, Retriever(task), models.reranker, models.adapter, cfg, margin)
    results, predictions = [], {}

    def answer(name: str) -> None:
        mode = MODES.get(name, MODES["hydra"])
        r, rows = run_method(name, task, test_users, lambda us: pipe.answer_many(us, mode), llm)
        results.append(r)
        predictions[name] = rows

    base_cost, base_s = llm.stats.copy(), time.perf_counter()
    if BASE_ONLY in methods:
        answer(BASE_ONLY)
    base_cost, base_s = llm.stats.minus(base_cost), time.perf_counter() - base_s
    report["fit"] = fit(task, llm, test_users, cfg, models, say)
    used = llm.stats.minus(before).minus(base_cost)
    report |= {"llm_calls": used.calls, "tokens": used.tokens, "cache_hits": used.cache_hits,
               "wall_s": round(time.perf_counter() - t0 - base_s, 2),
               "prompts": fit_stats(llm).minus(fitted).as_dict()}
    for name in methods:
        if name != BASE_ONLY:
            answer(name)
    return results, predictions, report, models


def _users(args: argparse.Namespace, values: dict) -> tuple[Task, list[User], list[User], list[User], str, str]:
    """The task, the train, test and label users (more_users: drawn from the train data after the split), the
    source and the data set's name."""
    if args.train_data or args.test_data:
        if not (args.train_data and args.test_data):
            raise ValueError("give --data DIR, or both --train-data DIR and --test-data DIR")
        if values["data"]:
            raise ValueError("give --data DIR or --train-data/--test-data, not both (--data would be ignored)")
        tr, te = load_split(args.train_data), load_split(args.test_data)
        if tr.task.name != te.task.name:
            raise ValueError(f"--train-data is {tr.task.name} but --test-data is {te.task.name}")
        task = tr.task
        train_users, _ = split_users(tr.users, values["train-users"], 0, values["seed"])
        _, test_users = split_users(te.users, 0, values["test-users"], values["seed"])
        pool = tr.users  # more_users leaves out the train and test users (by id, so also a test user in both files)
        source = f"train {args.train_data}, test {args.test_data}"
        name = dataset_name(args.test_data, task, values.get("data-name", ""))
    elif values["data"]:
        split = load_split(values["data"])
        task, source = split.task, values["data"]
        train_users, test_users = split_users(split.users, values["train-users"], values["test-users"], values["seed"])
        pool = split.users
        name = dataset_name(values["data"], task, values.get("data-name", ""))
    else:
        raise ValueError("give --data DIR (a LaMP split), or --train-data and --test-data")
    if values["task"] and values["task"] != task.name:
        raise ValueError(f"--task {values['task']} but the data is {task.name}")
    label_users = more_users(pool, train_users + test_users, values["label-users"], values["seed"])
    return task, train_users, test_users, label_users, source, name


HYDRA_METHODS = (*MODES, BASE_ONLY)
DEFAULT_REFERENCES = {"generation": "copy-input,first-words,mbr,closest,oracle",
                      "rating": "majority-label,user-mean,user-mode,mbr,oracle",
                      "classification": "majority-label,mbr,oracle"}


def default_methods(task: Task) -> str:
    """`--methods default`: the prompt baselines, the references of the task's kind, the hydra variants."""
    return f"zero-shot,rag-4,{DEFAULT_REFERENCES[task.kind]},hydra-reranker,hydra-adapter,hydra"


def evaluation_plan(args: argparse.Namespace, values: dict) -> dict:
    """What `fedhydra evaluate` will run, decided (and checked) before anything starts. Every flag lands here."""
    task, train_users, test_users, label_users, source, name = _users(args, values)
    listed = default_methods(task) if args.methods.strip() == "default" else args.methods
    methods = [m.strip() for m in listed.split(",") if m.strip()]
    check_methods(methods, (BASE_ONLY,))
    refs, hydra = [m for m in methods if m in REFERENCES], [m for m in methods if m in HYDRA_METHODS]
    if [m for m in refs if m in CANDIDATE_RULES] and not ({"hydra", "hydra-adapter"} & set(hydra)):
        raise ValueError("mbr, closest and oracle pick among hydra's candidates: add hydra or hydra-adapter")
    check_references(task, refs)
    cfg = HydraConfig.from_settings(values)
    if label_users and not (hydra and has_label_set_queries(task, cfg)):
        raise ValueError(f"--label-users {len(label_users)}: label users only add the hydra adapter's label-set "
                         f"queries; {task.name} has none here (a closed label set and adapter-label-queries > 0), "
                         "or no hydra method runs")
    return {"methods": methods, "out": Path(args.out), "values": values, "config": cfg, "task": task,
            "train_users": train_users, "label_users": label_users, "test_users": test_users, "source": source,
            "data_name": name, "train_data": args.train_data, "test_data": args.test_data}


def evaluate_command(args: argparse.Namespace, values: dict) -> Path:
    """Everything `fedhydra evaluate` does; see its --help. A method that fails does not stop the others; the
    finished ones' results are written, then the failure is reported (results.MethodsFailed)."""
    t0 = time.perf_counter()
    plan = evaluation_plan(args, values)
    methods, cfg, task, train_users, test_users = (plan[k] for k in ("methods", "config", "task", "train_users",
                                                                     "test_users"))
    refs, hydra, source = [m for m in methods if m in REFERENCES], [m for m in methods if m in HYDRA_METHODS], plan["source"]
    llm = llm_from_settings(values)
    out = plan["out"]
    label_users = plan["label_users"]
    print(f"{plan['data_name']}: {len(train_users)} train users, {len(test_users)} test users"
          + (f", {len(label_users)} label users" if label_users else "") + f", LLM {llm.name}, preset {cfg.preset}",
          flush=True)

    done = Outcomes(out)
    for name in (m for m in methods if m not in HYDRA_METHODS and m not in REFERENCES):
        done.attempt([name], lambda name=name: run_baselines(task, test_users, [name], llm, seed=cfg.seed,
                                                              style=cfg.style_or_none))
    info = {"data set": plan["data_name"], "task format": f"{task.name} ({task.title})", "data": source,
            "train users": len(train_users), "test users": len(test_users),
            **({"label users": len(label_users)} if label_users else {}), "seed": cfg.seed,
            "llm": llm.name, "prompt style": cfg.style or default_style(task), "preset": cfg.preset,
            "candidates": f"greedy + {cfg.candidates} at temperature {cfg.temperature}",
            "adapter labels": cfg.adapter_labels,
            "machine": f"{platform.machine()}, Python {platform.python_version()}"}
    extra: dict = {"config": cfg.as_dict(), "settings": values}
    if hydra:
        def _hydra():
            r, p, report, _ = run_hydra(task, llm, train_users, test_users, hydra, cfg, label_users=label_users)
            extra["hydra training"] = report
            info["adapter margin"] = "off" if report["margin"] is None else report["margin"]
            info["hydra train+fit s"] = report["wall_s"]
            cut = report["prompts"]
            info["hydra train+fit prompts cut to fit"] = f"{cut['cut']} of {cut['prompts']}" + (
                f" (mean {cut['mean_removed']:g} tokens removed)" if cut["cut"] else "")
            return r, p
        done.attempt(hydra, _hydra)
    run_references(done, task, test_users, refs, train_users)
    info["wall s"] = round(time.perf_counter() - t0, 1)
    info["peak RSS MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    order = {m: i for i, m in enumerate(methods)}
    results, predictions = sorted(done.results, key=lambda r: order[r.method]), done.predictions
    q = ratios(task, predictions, seed=cfg.seed)
    if done.failures:
        extra["failed"] = done.failures
    md = write_results(out, task, results, info, predictions, extra=extra, ratios=q)
    print("\n" + markdown_table(task, results, q) + f"\n\nresults: {md}")
    done.raise_failures()
    return out
