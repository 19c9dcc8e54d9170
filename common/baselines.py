"""The prompt-based methods HYDRA is compared with: zero-shot, ICL with k random items, RAG with BM25 top-k.

Each answers one user's query with one greedy LLM call (temperature 0), so the comparison with
HYDRA is against the LLM's best single answer, not against a random sample (MEASUREMENTS.md).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from . import fit
from .llm.base import LLM
from .llm.pool import fan_out
from .pipeline import Answer, messages_for
from .records import User
from .retrieval import Retriever
from .tasks import Task


@dataclass(frozen=True)
class Baseline:
    """`zero-shot`, `icl-random-<k>` or `rag-<k>`; `style` is the prompt format (prompts.STYLES)."""

    name: str
    kind: str
    k: int = 0
    style: str | None = None

    @classmethod
    def parse(cls, name: str, style: str | None = None) -> "Baseline":
        if name == "zero-shot":
            return cls(name, "zero-shot")
        m = re.fullmatch(r"(rag|icl-random)-(\d+)", name)
        if not m or int(m.group(2)) < 1:
            raise ValueError(f"unknown baseline {name!r}; expected zero-shot, rag-K or icl-random-K (K >= 1)")
        return cls(name, m.group(1), int(m.group(2)), style)

    def items(self, task: Task, retriever: Retriever, user: User, seed: int = 0) -> list[dict]:
        if self.kind == "rag":
            return retriever.top(user, task.content(user.input), self.k)
        if self.kind == "icl-random":
            rng = random.Random(f"{seed}:{user.id}")  # per user, independent of evaluation order
            return rng.sample(user.profile, min(self.k, len(user.profile)))
        return []

    def answer(self, task: Task, llm: LLM, retriever: Retriever, user: User, seed: int = 0) -> Answer:
        return self.answer_many(task, llm, retriever, [user], seed)[0]

    def answer_many(self, task: Task, llm: LLM, retriever: Retriever, users: list[User], seed: int = 0) -> list[Answer]:
        """Each user's answer, in order: retrieval here, the LLM's requests together through its request pool."""
        items = [self.items(task, retriever, u, seed) for u in users]

        def ask(j: int) -> Answer:
            messages = messages_for(task, llm, users[j].input, items[j], self.style, seed)
            text = llm.complete(messages, n=1, temperature=0.0, max_tokens=fit.answer_tokens(task, llm), seed=seed)[0]
            return Answer(text=text.strip(), items=items[j], candidates=[text])
        return fan_out(llm, ask, range(len(users)))
