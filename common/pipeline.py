"""HYDRA's inference for one query: BM25 top-M -> reranker top-k -> LLM candidates -> adapter argmax.

The greedy answer is always among the candidates (MEASUREMENTS.md: a random temperature-1
sample scores far below greedy on LaMP-7, so a weak adapter must not fall below greedy), and
a sample replaces it only when its adapter score is more than `cfg.adapter_margin` above the
greedy answer's (0, the default, is HYDRA's plain argmax with ties going to greedy).
Ablations: `reranker` only (reranker top-k + the greedy answer), `adapter` only (adapter over
zero-shot candidates), `full` (both).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import prompts
from .baselines import Answer
from .config import HydraConfig
from .llm.base import LLM
from .records import User
from .retrieval import Retriever
from .scorer import HydraScorer
from .tasks import Task

MODES = {"hydra": "full", "hydra-reranker": "reranker", "hydra-adapter": "adapter"}


def rerank(reranker: HydraScorer | None, user_id: str, task: Task, query: str, items: list[dict], k: int) -> list[dict]:
    """The k items the user's reranker head scores highest (BM25 order when there is no reranker)."""
    if reranker is None or len(items) <= 1:
        return items[:k]
    scores = reranker.score(user_id, query, [task.item_text(i) for i in items])
    order = sorted(range(len(items)), key=lambda j: (-scores[j], j))  # ties keep BM25 order
    return [items[j] for j in order[:k]]


def sample_candidates(task: Task, llm: LLM, messages: list[dict], n: int, seed: int) -> list[str]:
    """The greedy answer first, then `n` temperature-1 samples (seeded, so reruns hit the cache)."""
    max_tokens = prompts.MAX_TOKENS[task.kind]
    greedy = llm.complete(messages, n=1, temperature=0.0, max_tokens=max_tokens, seed=seed)
    samples = llm.complete(messages, n=n, temperature=1.0, max_tokens=max_tokens, seed=seed)
    return [c.strip() for c in greedy + samples]


@dataclass
class HydraPipeline:
    """Answers queries with a user's reranker and adapter heads (the default head for unknown users)."""

    task: Task
    llm: LLM
    retriever: Retriever
    reranker: HydraScorer | None
    adapter: HydraScorer | None
    config: HydraConfig

    def answer(self, user: User, mode: str = "full") -> Answer:
        if mode not in ("full", "reranker", "adapter"):
            raise ValueError(f"unknown pipeline mode {mode!r}")
        cfg, task = self.config, self.task
        query = task.content(user.input)
        items: list[dict] = []
        if mode != "adapter":
            retrieved = self.retriever.top(user, query, cfg.retrieve)
            items = rerank(self.reranker, user.id, task, query, retrieved, cfg.k)
        messages = prompts.with_items(task, user.input, items, cfg.style)
        if mode == "reranker" or self.adapter is None:
            text = self.llm.complete(messages, n=1, temperature=0.0,
                                     max_tokens=prompts.MAX_TOKENS[task.kind], seed=cfg.seed)[0].strip()
            return Answer(text=text, items=items, candidates=[text])
        candidates = sample_candidates(task, self.llm, messages, cfg.candidates, cfg.seed)
        scores = self.adapter.score(user.id, query, candidates)
        best = max(range(len(candidates)), key=lambda j: (scores[j], -j))  # ties: the earlier (greedy first)
        if scores[best] - scores[0] <= cfg.adapter_margin:
            best = 0  # not clearly better than greedy (cfg.adapter_margin; 0 = HYDRA's plain argmax)
        return Answer(text=candidates[best], items=items, candidates=candidates, scores=[float(s) for s in scores])
