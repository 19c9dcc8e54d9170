"""Run methods over the same users and LLM, measure each (metrics, LLM usage, wall time), and compare
them with the best prompt baseline: the ratio and its 95% paired bootstrap interval over users.

Reference methods on the same users (no training, no extra LLM call), the rules a skeptic would ask for:
- copy-input (generation): the query's content itself as the answer, an honest trivial baseline;
- first-words (generation): the first N words of the query's content, N the median length in words of the
  titles the training users wrote (profile and held-out query), rounded;
- majority-label (rating, classification): the label most frequent among the training users' held-out
  queries (ties: the label listed first), the same answer for everyone;
- user-mean, user-mode (rating): each user's own profile ratings, their mean rounded half up, and their most
  frequent rating (ties: the one nearest their mean, then the higher): training-free *per-user* rules;
- mbr, closest: training-free picks among the candidates hydra saw (selection.py; for a rating mbr is the
  LLM answer nearest the others, i.e. their median: MBR under the MAE);
- oracle: the best of those candidates by the gold, a diagnostic upper bound, never a method.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable

import numpy as np

from fedhydra.common import fit, selection
from fedhydra.common.baselines import Baseline
from fedhydra.common.llm.base import LLM
from fedhydra.common.metrics import evaluate, rating_error, rating_value, rouge_pair, is_correct
from fedhydra.common.pipeline import Answer
from fedhydra.common.records import User
from fedhydra.common.retrieval import Retriever
from fedhydra.common.tasks import Task

from .results import MethodResult

AnswersFn = Callable[[list[User]], list[Answer]]  # every user's answer, in order
PROMPT_BASELINES = ("zero-shot", "rag-")
REFERENCES = ("copy-input", "first-words", "majority-label", "user-mean", "user-mode", "mbr", "closest", "oracle")
CANDIDATE_RULES = ("mbr", "closest", "oracle")  # pick among hydra's candidates: need hydra or hydra-adapter
REFERENCE_KINDS = {"copy-input": ("generation",), "first-words": ("generation",),
                   "majority-label": ("rating", "classification"), "user-mean": ("rating",), "user-mode": ("rating",)}
BOOTSTRAP = 2000


def run_method(name: str, task: Task, users: list[User], answers: AnswersFn, llm: LLM,
               progress: bool = True) -> tuple[MethodResult, list[dict]]:
    """Answer every user's query with `answers` (all users at once, so their LLM requests share the request
    pool); score against the golds; count what it cost."""
    missing = [u.id for u in users if u.gold is None]
    if missing:
        raise ValueError(f"{name}: users without a gold answer cannot be evaluated: {missing[:5]}")
    before, t0, fitted = llm.stats.copy(), time.perf_counter(), fit.fit_stats(llm).copy()
    got = answers(users)
    if len(got) != len(users):
        raise RuntimeError(f"{name}: {len(got)} answers for {len(users)} users")
    rows = [{"id": user.id, "prediction": a.text, "gold": user.gold, "items": [it.get("id") for it in a.items],
             "candidates": a.candidates, "scores": a.scores, "sampled": a.sampled} for user, a in zip(users, got)]
    if progress:
        print(f"{name}: {len(users)}/{len(users)} users", flush=True)
    used = llm.stats.minus(before)
    result = score_rows(name, task, rows, used.calls, used.tokens, used.cache_hits, time.perf_counter() - t0)
    result.extra["prompts"] = fit.fit_stats(llm).minus(fitted).as_dict()  # how many were cut to fit, by how much
    return result, rows


def score_rows(name: str, task: Task, rows: list[dict], calls: int = 0, tokens: int = 0, hits: int = 0,
               wall: float = 0.0) -> MethodResult:
    metrics = evaluate(task, [r["prediction"] for r in rows], [r["gold"] for r in rows])
    return MethodResult(name, metrics, len(rows), calls, tokens, hits, round(wall, 2))


def run_baselines(task: Task, users: list[User], methods: list[str], llm: LLM, seed: int = 0,
                  style: str | None = None, progress: bool = True):
    """The prompt baselines (zero-shot, icl-random-K, rag-K) on `users`; returns (results, predictions)."""
    retriever = Retriever(task)
    results, predictions = [], {}
    for name in methods:
        b = Baseline.parse(name, style)
        r, rows = run_method(name, task, users, lambda us, b=b: b.answer_many(task, llm, retriever, us, seed), llm,
                             progress)
        results.append(r)
        predictions[name] = rows
    return results, predictions


def llm_candidates(rows: list[dict]) -> dict[str, list[str]]:
    """user id -> the candidates the LLM gave a hydra method (not the labels its adapter added)."""
    return {r["id"]: r["candidates"][:r.get("sampled") or None] for r in rows}


def check_references(task: Task, methods: list[str]) -> None:
    """Refuse a reference that has no meaning for the task's kind, before anything runs."""
    for m in methods:
        kinds = REFERENCE_KINDS.get(m)
        if kinds and task.kind not in kinds:
            raise ValueError(f"{m} is a reference for {' and '.join(kinds)} tasks; {task.name} is {task.kind}")


def run_references(done, task: Task, users: list[User], methods: list[str], train_users: list[User] = ()) -> None:
    """The reference methods into `done` (results.Outcomes); mbr/closest/oracle need the candidates of a finished
    hydra or hydra-adapter, first-words and majority-label the training users, the others nothing."""
    rows = done.predictions.get("hydra") or done.predictions.get("hydra-adapter")
    needy = [m for m in methods if m in CANDIDATE_RULES]
    if rows is None and needy:
        done.fail(needy, "needs the candidates of hydra or hydra-adapter, which did not run or failed")
        methods = [m for m in methods if m not in needy]
    if methods:
        done.attempt(methods, lambda: references(task, users, methods, llm_candidates(rows or []), train_users))


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def user_ratings(task: Task, user: User) -> list[int]:
    """The ratings of the user's profile items (items without a readable rating are left out)."""
    values = [rating_value(task.item_answer(i)) for i in user.profile]
    return [int(v) for v in values if v is not None]


def user_mean(task: Task, user: User) -> str:
    """The user's mean profile rating, rounded half up; ValueError when the profile has no rating."""
    ratings = user_ratings(task, user)
    if not ratings:
        raise ValueError(f"user-mean: user {user.id} has no rated profile item")
    return str(_round_half_up(sum(ratings) / len(ratings)))


def user_mode(task: Task, user: User) -> str:
    """The user's most frequent profile rating; ties go to the one nearest their mean, then to the higher."""
    ratings = user_ratings(task, user)
    if not ratings:
        raise ValueError(f"user-mode: user {user.id} has no rated profile item")
    mean, counts = sum(ratings) / len(ratings), Counter(ratings)
    return str(max(counts, key=lambda r: (counts[r], -abs(r - mean), r)))


def majority_label(task: Task, train_users: list[User]) -> str:
    """The label most frequent among the training users' held-out queries (ties: the label listed first)."""
    golds = [u.gold for u in train_users if u.gold is not None]
    if not golds:
        raise ValueError("majority-label needs training users with gold answers (--train-users >= 1)")
    counts = Counter(label for g in golds for label in task.labels if is_correct(task, label, g))
    return max(task.labels, key=lambda label: (counts[label], -task.labels.index(label)))


def title_words(task: Task, train_users: list[User]) -> int:
    """The median length in words (rounded half up, at least 1) of every title the training users wrote."""
    titles = [task.item_answer(i) for u in train_users for i in u.profile] + \
        [u.gold for u in train_users if u.gold is not None]
    if not titles:
        raise ValueError("first-words needs training users with titles (--train-users >= 1)")
    return max(1, _round_half_up(float(np.median([len(t.split()) for t in titles]))))


def references(task: Task, users: list[User], methods: list[str], candidates_of: dict[str, list[str]],
               train_users: list[User] = ()):
    """The reference methods in `methods`; mbr/closest/oracle pick among `candidates_of[user id]`."""
    check_references(task, methods)
    results, predictions = [], {}
    by_id = {u.id: u for u in users}
    for name in methods:
        rows = []
        shared = {"majority-label": lambda: majority_label(task, list(train_users)),
                  "first-words": lambda: title_words(task, list(train_users))}.get(name, lambda: None)()
        for u in users:
            query, cands = task.content(u.input), candidates_of.get(u.id) or []
            if name == "copy-input":
                text = query
            elif name == "first-words":
                text = " ".join(query.split()[:shared])
            elif name == "majority-label":
                text = shared
            elif name in ("user-mean", "user-mode"):
                text = (user_mean if name == "user-mean" else user_mode)(task, u)
            elif not cands:
                raise ValueError(f"{name} picks among hydra's candidates: run it with hydra or hydra-adapter")
            elif name == "oracle":
                text = cands[selection.oracle(task, cands, by_id[u.id].gold)]
            else:
                text = cands[getattr(selection, name)(task, query, cands)]
            rows.append({"id": u.id, "prediction": text, "gold": u.gold, "candidates": cands})
        results.append(score_rows(name, task, rows))
        if shared is not None:
            results[-1].extra["rule"] = {"majority-label": "label", "first-words": "words"}[name] + f" {shared}"
        predictions[name] = rows
    return results, predictions


def per_user(task: Task, rows: list[dict]) -> np.ndarray:
    """Each user's value of the task's first metric (generation: ROUGE-1 F; classification: correct; rating: |error|)."""
    if task.kind == "generation":
        return np.array([rouge_pair(r["prediction"], r["gold"])[0] for r in rows])
    if task.kind == "classification":
        return np.array([float(is_correct(task, r["prediction"], r["gold"])) for r in rows])
    return np.array([rating_error(r["prediction"], r["gold"]) for r in rows], dtype=float)


def ratios(task: Task, predictions: dict[str, list[dict]], seed: int = 0) -> dict[str, dict]:
    """Each method's ratio to the best prompt baseline on the same users (first metric; MAE inverted so that
    above 1 is better), with a 95% paired bootstrap interval over users. {} without a prompt baseline."""
    base = [m for m in predictions if m.startswith(PROMPT_BASELINES)]
    if not base:
        return {}
    order = [u["id"] for u in predictions[base[0]]]
    values = {}
    for m, rows in predictions.items():
        by = {r["id"]: r for r in rows}
        if set(by) == set(order):
            values[m] = per_user(task, [by[i] for i in order])
    best = (max if task.higher_is_better else min)(base, key=lambda m: values[m].mean())
    idx = np.random.default_rng(seed).integers(0, len(order), (BOOTSTRAP, len(order)))
    return {m: _ratio(task, v, values[best], idx) | {"baseline": best} for m, v in values.items()}


def paired_ratio(task: Task, rows: list[dict], reference: list[dict], seed: int = 0) -> dict | None:
    """`rows`' ratio to `reference` (the same convention as ratios: above 1 is better) with its 95% paired
    bootstrap interval, over the users both answered; None if they share none."""
    by, ref = {r["id"]: r for r in rows}, {r["id"]: r for r in reference}
    ids = [i for i in ref if i in by]
    if not ids:
        return None
    idx = np.random.default_rng(seed).integers(0, len(ids), (BOOTSTRAP, len(ids)))
    return _ratio(task, per_user(task, [by[i] for i in ids]), per_user(task, [ref[i] for i in ids]), idx) | \
        {"users": len(ids)}


def _ratio(task: Task, v: np.ndarray, ref: np.ndarray, idx: np.ndarray) -> dict:
    num, den = (v, ref) if task.higher_is_better else (ref, v)
    point = num.mean() / den.mean() if den.mean() else float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):  # a resample whose baseline scores 0: no ratio
        boot = num[idx].mean(1) / den[idx].mean(1)
        boot[~np.isfinite(boot)] = np.nan
        lo, hi = np.nanpercentile(boot, [2.5, 97.5]) if not np.isnan(boot).all() else (np.nan, np.nan)
    return {"ratio": round(float(point), 4), "low": round(float(lo), 4), "high": round(float(hi), 4)}
