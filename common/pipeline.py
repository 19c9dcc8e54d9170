"""HYDRA's inference for one query: BM25 top-M -> reranker top-k -> LLM candidates -> adapter choice.

The greedy answer is always the first candidate (MEASUREMENTS.md: a random sample scores far below
greedy on LaMP-7), and a sample replaces it only when the adapter scores it more than `margin` above
the greedy answer (selection.pick; the margin is calibrated on held-out training queries, None keeps
greedy). Ablations: `reranker` (reranker top-k + the greedy answer), `adapter` (adapter over
zero-shot candidates), `full` (both).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import fit, prompts, selection
from .config import HydraConfig
from .llm.base import LLM
from .records import User
from .retrieval import Retriever
from .scorer import HydraScorer
from .tasks import Task

MODES = {"hydra": "full", "hydra-reranker": "reranker", "hydra-adapter": "adapter"}
NEUTRAL_PROMPT = (
    "Rewrite the following tweet as plain, neutral standard English, without slang, hashtags, mentions or "
    "emoticons. Answer with the rewritten sentence only.\nTweet: {text}"
)


@dataclass
class Answer:
    """What a method answered for one query, and what it used to get there."""

    text: str
    items: list[dict] = field(default_factory=list)  # profile items shown to the LLM, best first
    candidates: list[str] = field(default_factory=list)  # the LLM's first (greedy, samples), then added labels
    scores: list[float] = field(default_factory=list)
    sampled: int | None = None  # how many of the candidates the LLM gave (None: all)


def neutral_input(llm: LLM, text: str, seed: int) -> str:
    """The LLM's greedy neutral rewrite of an item that has no input (a LaMP-7 tweet): its pseudo-input."""
    max_tokens = fit.GENERATION_TOKENS
    messages = fit.fit_messages(llm, lambda t: [{"role": "user", "content": NEUTRAL_PROMPT.format(text=t[0])}],
                                [text], max_tokens, what="neutral rewrite prompt")
    out = llm.complete(messages, n=1, temperature=0.0, max_tokens=max_tokens, seed=seed)[0]
    return out.strip().strip('"') or text


def _longest_field(task: Task, item: dict) -> str:
    """The item's text field that fitting may cut (every LaMP task has one; the longest if there were more)."""
    return max(task.text_fields, key=lambda f: len(str(item.get(f, ""))))


def messages_for(task: Task, llm: LLM, task_input: str, items: list[dict], style: str | None, seed: int,
                 max_tokens: int | None = None) -> list[dict]:
    """The prompt with `items`, cut to fit the LLM's context window with `max_tokens` (default: the task's answer
    size, fit.answer_tokens) left for the answer (fit.py: LaMP's truncation of the input and the item texts).
    The chat style on a task whose items have no input (LaMP-7) first gives each item its pseudo-input (one
    cached LLM call per item)."""
    style = style or prompts.default_style(task)
    if style == "chat" and task.label_field is None:
        items = [{**i, prompts.PSEUDO_INPUT: neutral_input(llm, task.item_text(i), seed)} for i in items]
    head, body = fit.split_input(task, task_input)
    fields = [_longest_field(task, i) for i in items]

    def build(texts: list[str]) -> list[dict]:
        cut = [{**i, f: t} for i, f, t in zip(items, fields, texts[1:])]
        return prompts.with_items(task, head + texts[0], cut, style)

    texts = [body] + [str(i[f]) for i, f in zip(items, fields)]
    return fit.fit_messages(llm, build, texts, max_tokens or fit.answer_tokens(task, llm), what=f"{task.name} prompt")


def rerank(reranker: HydraScorer | None, user_id: str, task: Task, query: str, items: list[dict], k: int) -> list[dict]:
    """The k items the user's reranker head scores highest (BM25 order when there is no reranker)."""
    if reranker is None or len(items) <= 1:
        return items[:k]
    scores = reranker.score(user_id, query, [task.item_text(i) for i in items])
    order = sorted(range(len(items)), key=lambda j: (-scores[j], j))  # ties keep BM25 order
    return [items[j] for j in order[:k]]


def sample_candidates(task: Task, llm: LLM, messages: list[dict], n: int, seed: int, temperature: float) -> list[str]:
    """The greedy answer first, then `n` samples at `temperature` (seeded, so reruns hit the cache)."""
    max_tokens = fit.answer_tokens(task, llm)
    greedy = llm.complete(messages, n=1, temperature=0.0, max_tokens=max_tokens, seed=seed)
    samples = llm.complete(messages, n=n, temperature=temperature, max_tokens=max_tokens, seed=seed)
    return [c.strip() for c in greedy + samples]


def history_answers(task: Task, retriever: Retriever, user: User, query: str, k: int) -> list[str]:
    """The answers (tag, rating, text) of the user's k profile items BM25 retrieves for the query: the history
    the adapter's `history` feature compares candidates with (selection.candidate_features)."""
    return [task.item_answer(i) for i in retriever.top(user, query, k)]


def adapter_scores(adapter: HydraScorer, task: Task, user_id: str, query: str, candidates: list[str],
                   sampled: int | None = None, history: list[str] | None = None) -> list[float]:
    """The adapter's log-odds of each candidate, with the candidate features the scorer takes (candidates[:sampled]
    are the LLM's; see selection.with_labels; `history`: history_answers for the query)."""
    extra = selection.candidate_features(task, query, candidates, sampled, history or ()) if adapter.extra else None
    return adapter.log_odds(user_id, query, candidates, extra)


@dataclass
class HydraPipeline:
    """Answers queries with a user's reranker and adapter heads (the default head for unknown users)."""

    task: Task
    llm: LLM
    retriever: Retriever
    reranker: HydraScorer | None
    adapter: HydraScorer | None
    config: HydraConfig
    margin: float | None = 0.0  # adapter margin (None: always the greedy answer)

    def candidates(self, user: User, mode: str = "full") -> tuple[list[dict], list[str]]:
        """(items in the prompt, greedy answer + B samples) for the user's query."""
        cfg, task = self.config, self.task
        items: list[dict] = []
        if mode != "adapter":
            retrieved = self.retriever.top(user, task.content(user.input), cfg.retrieve)
            items = rerank(self.reranker, user.id, task, task.content(user.input), retrieved, cfg.k)
        messages = messages_for(task, self.llm, user.input, items, cfg.style_or_none, cfg.seed)
        if mode == "reranker" or self.adapter is None:
            text = self.llm.complete(messages, n=1, temperature=0.0, max_tokens=fit.answer_tokens(task, self.llm),
                                     seed=cfg.seed)[0].strip()
            return items, [text]
        return items, sample_candidates(task, self.llm, messages, cfg.candidates, cfg.seed, cfg.temperature)

    def answer(self, user: User, mode: str = "full") -> Answer:
        if mode not in ("full", "reranker", "adapter"):
            raise ValueError(f"unknown pipeline mode {mode!r}")
        items, sampled = self.candidates(user, mode)
        if len(sampled) == 1:
            return Answer(text=sampled[0], items=items, candidates=sampled)
        # the graded adapter also weighs the labels the LLM did not name (selection.with_labels)
        candidates = selection.with_labels(self.task, sampled) if self.adapter.extra else sampled
        query = self.task.content(user.input)
        history = history_answers(self.task, self.retriever, user, query, self.config.k) if self.adapter.extra else []
        scores = adapter_scores(self.adapter, self.task, user.id, query, candidates, len(sampled), history)
        best = selection.pick(scores, self.margin)
        return Answer(text=candidates[best], items=items, candidates=candidates, scores=[float(s) for s in scores],
                      sampled=len(sampled))
