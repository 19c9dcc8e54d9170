"""Run methods over the same users and LLM, and measure each: metrics, LLM usage, wall time."""

from __future__ import annotations

import time
from collections.abc import Callable

from tqdm import tqdm

from fedhydra.common.baselines import Answer, Baseline
from fedhydra.common.llm.base import LLM
from fedhydra.common.metrics import evaluate
from fedhydra.common.records import User
from fedhydra.common.retrieval import Retriever
from fedhydra.common.tasks import Task

from .results import MethodResult

AnswerFn = Callable[[User], Answer]


def run_method(name: str, task: Task, users: list[User], answer: AnswerFn, llm: LLM,
               progress: bool = True) -> tuple[MethodResult, list[dict]]:
    """Answer every user's query with `answer`; score against the golds; count what it cost."""
    missing = [u.id for u in users if u.gold is None]
    if missing:
        raise ValueError(f"{name}: users without a gold answer cannot be evaluated: {missing[:5]}")
    before, t0 = llm.stats.copy(), time.perf_counter()
    rows = []
    for user in tqdm(users, desc=name, unit="user", disable=not progress):
        a = answer(user)
        rows.append({"id": user.id, "prediction": a.text, "gold": user.gold,
                     "items": [i.get("id") for i in a.items], "candidates": a.candidates, "scores": a.scores})
    wall = time.perf_counter() - t0
    used = llm.stats.minus(before)
    metrics = evaluate(task, [r["prediction"] for r in rows], [r["gold"] for r in rows])
    result = MethodResult(name, metrics, len(users), used.calls, used.tokens, used.cache_hits, round(wall, 2))
    return result, rows


def run_baselines(task: Task, users: list[User], methods: list[str], llm: LLM, seed: int = 0,
                  style: str | None = None, progress: bool = True):
    """The prompt baselines (zero-shot, icl-random-K, rag-K) on `users`; returns (results, predictions)."""
    retriever = Retriever(task)
    results, predictions = [], {}
    for name in methods:
        b = Baseline.parse(name, style)
        r, rows = run_method(name, task, users, lambda u, b=b: b.answer(task, llm, retriever, u, seed), llm, progress)
        results.append(r)
        predictions[name] = rows
    return results, predictions
