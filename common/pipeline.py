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
from .protocol import ADAPTER, ANSWER_MODES, FULL, RERANKER
from .llm.pool import fan_out
from .records import User
from .retrieval import Retriever
from .scorer import HydraScorer
from .tasks import Task

MODES = {"hydra": FULL, "hydra-reranker": RERANKER, "hydra-adapter": ADAPTER}  # method name -> answer mode
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
        pseudo = fan_out(llm, lambda i: neutral_input(llm, task.item_text(i), seed), items)
        items = [{**i, prompts.PSEUDO_INPUT: p} for i, p in zip(items, pseudo)]
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
    """The greedy answer first, then `n` samples at `temperature` (seeded, so reruns hit the cache); the two
    requests go through the request pool together."""
    max_tokens = fit.answer_tokens(task, llm)
    greedy, samples = fan_out(llm, lambda r: llm.complete(messages, n=r[0], temperature=r[1], max_tokens=max_tokens,
                                                          seed=seed), [(1, 0.0), (n, temperature)])
    return [c.strip() for c in greedy + samples]


def history_answers(task: Task, retriever: Retriever, user: User, query: str, k: int) -> list[str]:
    """The answers (tag, rating, text) of the user's k profile items BM25 retrieves for the query: the history
    the adapter's `history` feature compares candidates with (selection.candidate_features)."""
    return [task.item_answer(i) for i in retriever.top(user, query, k)]


def profile_answers(task: Task, user: User, exclude_id: str | None = None) -> list[str]:
    """The answers of all the user's profile items (but `exclude_id`, a pseudo-query's own item): the profile the
    adapter's `profile` feature compares candidates with (selection.candidate_features)."""
    return [task.item_answer(i) for i in user.profile if str(i["id"]) != exclude_id]


def adapter_scores(adapter: HydraScorer, task: Task, user_id: str, query: str, candidates: list[str],
                   sampled: int | None = None, history: list[str] | None = None,
                   profile: list[str] | None = None) -> list[float]:
    """The adapter's log-odds of each candidate, with the candidate features the scorer takes (candidates[:sampled]
    are the LLM's; see selection.with_labels; `history`: history_answers for the query; `profile`: profile_answers)."""
    extra = (selection.candidate_features(task, query, candidates, sampled, history or (), profile or ())
             if adapter.extra else None)
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

    def prompt_items(self, user: User, mode: str = FULL) -> list[dict]:
        """The profile items the prompt for the user's query holds: BM25 top-M, then the reranker's top-k."""
        cfg, task = self.config, self.task
        if mode == ADAPTER:
            return []
        retrieved = self.retriever.top(user, task.content(user.input), cfg.retrieve)
        return rerank(self.reranker, user.id, task, task.content(user.input), retrieved, cfg.k)

    def sample(self, user: User, items: list[dict], mode: str = FULL) -> list[str]:
        """The LLM's greedy answer (and B samples when the adapter will choose) for the query with `items`."""
        cfg, task = self.config, self.task
        messages = messages_for(task, self.llm, user.input, items, cfg.style_or_none, cfg.seed)
        if mode == RERANKER or self.adapter is None:
            text = self.llm.complete(messages, n=1, temperature=0.0, max_tokens=fit.answer_tokens(task, self.llm),
                                     seed=cfg.seed)[0].strip()
            return [text]
        return sample_candidates(task, self.llm, messages, cfg.candidates, cfg.seed, cfg.temperature)

    def candidates(self, user: User, mode: str = FULL) -> tuple[list[dict], list[str]]:
        """(items in the prompt, greedy answer + B samples) for the user's query."""
        items = self.prompt_items(user, mode)
        return items, self.sample(user, items, mode)

    def choose(self, user: User, items: list[dict], sampled: list[str]) -> Answer:
        """The adapter's pick among the LLM's candidates (and the labels it did not name)."""
        if len(sampled) == 1:
            return Answer(text=sampled[0], items=items, candidates=sampled)
        # the graded adapter also weighs the labels the LLM did not name (selection.with_labels)
        candidates = selection.with_labels(self.task, sampled) if self.adapter.extra else sampled
        query = self.task.content(user.input)
        history, profile = ((history_answers(self.task, self.retriever, user, query, self.config.k),
                             profile_answers(self.task, user))
                            if self.adapter.extra and self.config.adapter_history else ([], []))
        scores = adapter_scores(self.adapter, self.task, user.id, query, candidates, len(sampled), history, profile)
        best = selection.pick(scores, self.margin,
                              selection.decision_values(self.task, candidates, self.config.rating_answer))
        return Answer(text=candidates[best], items=items, candidates=candidates, scores=[float(s) for s in scores],
                      sampled=len(sampled))

    def answer(self, user: User, mode: str = FULL) -> Answer:
        return self.answer_many([user], mode)[0]

    def answer_many(self, users: list[User], mode: str = FULL) -> list[Answer]:
        """Each user's answer, in order. The reranker, then the LLM's requests of all users together (the request
        pool), then the adapter: each scorer sees the users in the same order whatever the pool's size."""
        if mode not in ANSWER_MODES:
            raise ValueError(f"unknown answer mode {mode!r}; modes: {', '.join(ANSWER_MODES)}")
        items = [self.prompt_items(u, mode) for u in users]
        sampled = fan_out(self.llm, lambda j: self.sample(users[j], items[j], mode), range(len(users)))
        return [self.choose(u, i, s) for u, i, s in zip(users, items, sampled)]
