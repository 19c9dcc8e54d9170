"""Training labels from LLM feedback on a user's own history (HYDRA.md §1.2–§1.4, with §7–§8 fixed).

A pseudo-query is a profile item turned into a query: its text is the input, its answer the
target. For a user being fitted only their profile is used: their real query and its gold
never reach this module. A pseudo-query never retrieves the item it was made from.

- Reranker: for each pseudo-query and each of its top-M retrieved items, the LLM answers with
  that item as the only demonstration (greedy). The item is a positive when the answer is right
  (exact match after the metric's postprocessing); for generation tasks when
  (ROUGE-1 + ROUGE-L)/2 is above that user's mean over all their rows.
- Adapter: for each pseudo-query, the prompt holds the reranker's top-k items; the LLM gives
  its greedy answer and B temperature-1 samples. Classification/rating: a candidate is a
  positive when it is right. Generation: the gold is the positive and the candidates are
  negatives, as the reference code does ("gold"), or candidates above the query's mean score
  are positives ("above-mean").
- Adapter, label-set queries (classification/rating, `cfg.adapter_label_queries` > 0, not in
  HYDRA): a task with a closed label set knows the truth of *every* label for a profile item,
  so further items become adapter queries whose candidates are all the labels, the item's own
  label positive (weighted to balance them) and the others negative. This costs no LLM call (a pseudo-query's candidates
  cost B+1), so the per-user head sees the user's label habits over many items instead of a few
  (the cpu preset's 3 pseudo-queries leave its scores nearly flat across candidates). It is the
  classification analogue of HYDRA's generation labels, where the gold itself is a positive.

LaMP-7 profile tweets have no input. Their pseudo-input is the LLM's greedy neutral rewrite of
the tweet (NEUTRAL_PROMPT), which mirrors LaMP-7's real inputs (a neutral paraphrase of the
tweet to be written in the user's style); the tweet itself is the target.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from statistics import fmean

from . import prompts
from .config import HydraConfig
from .llm.base import LLM
from .metrics import is_correct, rouge_pair
from .pipeline import rerank, sample_candidates
from .records import User
from .retrieval import Retriever
from .scorer import HydraScorer
from .tasks import Task
from .training import ScoredExample

NEUTRAL_PROMPT = (
    "Rewrite the following tweet as plain, neutral standard English, without slang, hashtags, mentions or "
    "emoticons. Answer with the rewritten sentence only.\nTweet: {text}"
)


@dataclass(frozen=True)
class PseudoQuery:
    user_id: str
    item_id: str | None  # the profile item it was made from (None: a training user's real query)
    content: str  # the query's content (what retrieval and the scorers see)
    input: str  # the full task input sent to the LLM
    target: str


def _neutral_input(task: Task, llm: LLM, text: str, seed: int) -> str:
    messages = [{"role": "user", "content": NEUTRAL_PROMPT.format(text=text)}]
    out = llm.complete(messages, n=1, temperature=0.0, max_tokens=prompts.MAX_TOKENS["generation"], seed=seed)[0]
    return out.strip().strip('"') or text


def pseudo_queries(task: Task, llm: LLM, user: User, cfg: HydraConfig, real_query: bool = False) -> list[PseudoQuery]:
    """`cfg.pseudo_queries` profile items drawn per user (seeded), plus the real query when `real_query`
    (training users only: their gold is training data, never a test user's)."""
    rng = random.Random(f"{cfg.seed}:{user.id}")
    items = rng.sample(user.profile, min(cfg.pseudo_queries, len(user.profile)))
    out = []
    for item in items:
        if task.label_field is None:
            content = _neutral_input(task, llm, task.item_text(item), cfg.seed)
        else:
            content = task.item_text(item)
        out.append(PseudoQuery(user.id, str(item["id"]), content, task.instruction(content), task.item_answer(item)))
    if real_query:
        if user.gold is None:
            raise ValueError(f"user {user.id}: real_query needs a gold answer")
        out.append(PseudoQuery(user.id, None, task.content(user.input), user.input, user.gold))
    return out


def _retrieved(retriever: Retriever, user: User, pq: PseudoQuery, m: int) -> list[dict]:
    exclude = () if pq.item_id is None else (pq.item_id,)
    return retriever.top(user, pq.content, m, exclude_ids=exclude)


def reranker_examples(task: Task, llm: LLM, retriever: Retriever, user: User, pqs: list[PseudoQuery],
                      cfg: HydraConfig) -> list[ScoredExample]:
    """One example per (pseudo-query, retrieved item), labelled by the 1-shot answer it leads to."""
    rows: list[tuple[PseudoQuery, dict, float | bool]] = []
    for pq in pqs:
        for item in _retrieved(retriever, user, pq, cfg.retrieve):
            messages = prompts.with_items(task, pq.input, [item], cfg.style)
            answer = llm.complete(messages, n=1, temperature=0.0, max_tokens=prompts.MAX_TOKENS[task.kind],
                                  seed=cfg.seed)[0].strip()
            if task.kind == "generation":
                rows.append((pq, item, fmean(rouge_pair(answer, pq.target))))
            else:
                rows.append((pq, item, is_correct(task, answer, pq.target)))
    if task.kind == "generation" and rows:
        mean = fmean(float(r[2]) for r in rows)  # the user's mean over all their rows (HYDRA.md §1.3)
        rows = [(pq, item, float(s) > mean) for pq, item, s in rows]
    return [ScoredExample(user.id, pq.content, task.item_text(item), int(bool(good))) for pq, item, good in rows]


def adapter_examples(task: Task, llm: LLM, retriever: Retriever, user: User, pqs: list[PseudoQuery],
                     cfg: HydraConfig, reranker: HydraScorer | None) -> list[ScoredExample]:
    """Candidates for each pseudo-query from the prompt with the reranker's top-k items, labelled per task kind."""
    out: list[ScoredExample] = []
    for pq in pqs:
        items = rerank(reranker, user.id, task, pq.content, _retrieved(retriever, user, pq, cfg.retrieve), cfg.k)
        messages = prompts.with_items(task, pq.input, items, cfg.style)
        candidates = list(dict.fromkeys(sample_candidates(task, llm, messages, cfg.candidates, cfg.seed)))
        if task.kind != "generation":
            out += [ScoredExample(user.id, pq.content, c, int(is_correct(task, c, pq.target))) for c in candidates]
        elif cfg.adapter_generation_labels == "gold":
            out += [ScoredExample(user.id, pq.content, c, 0) for c in candidates if c != pq.target.strip()]
            out.append(ScoredExample(user.id, pq.content, pq.target.strip(), 1))
        else:
            scores = [fmean(rouge_pair(c, pq.target)) for c in candidates]
            mean = fmean(scores)
            out += [ScoredExample(user.id, pq.content, c, int(s > mean)) for c, s in zip(candidates, scores)]
    return out + label_set_examples(task, user, cfg)


def label_set_examples(task: Task, user: User, cfg: HydraConfig) -> list[ScoredExample]:
    """Classification/rating: `cfg.adapter_label_queries` profile items (seeded) scored against every
    label of the task, the item's own label the only positive; no LLM call. [] for generation tasks."""
    if task.kind == "generation" or not task.labels or cfg.adapter_label_queries <= 0:
        return []
    rng = random.Random(f"{cfg.seed}:{user.id}:label-set")
    items = rng.sample(user.profile, min(cfg.adapter_label_queries, len(user.profile)))
    out = []
    for item in items:
        query, target = task.item_text(item), task.item_answer(item)
        good = [label for label in task.labels if is_correct(task, label, target)]
        bad = [label for label in task.labels if label not in good]
        # The positive is repeated so each query's positives weigh as much as its negatives: with 1
        # positive in 15 the heads learn "always negative" (measured: flat scores, argmax at chance).
        reps = max(1, len(bad) // max(1, len(good)))
        out += [ScoredExample(user.id, query, label, 1) for label in good for _ in range(reps)]
        out += [ScoredExample(user.id, query, label, 0) for label in bad]
    return out
