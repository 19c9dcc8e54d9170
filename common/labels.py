"""Training labels from LLM feedback on a user's own history (HYDRA.md §1.2–§1.4, with §7–§8 fixed).

A pseudo-query is a profile item turned into a query: its text is the input, its answer the
target. For a user being fitted only their profile is used: their real query and its gold never
reach this module. A pseudo-query never retrieves the item it was made from.

- Reranker (HYDRA): for each pseudo-query and each of its top-M retrieved items, the LLM answers with
  that item as the only demonstration (greedy). The item is a positive when the answer is right
  (exact match after the metric's postprocessing); for generation tasks when (ROUGE-1 + ROUGE-L)/2
  is above that user's mean over all their rows.
- Adapter: for each pseudo-query, the prompt holds the reranker's top-k items; the LLM gives its
  greedy answer and B samples. `adapter-labels`:
  - graded (FedHydra, default): one CandidateGroup per query, every candidate graded by the task
    metric against the target, trained with a listwise loss (examples.py), with the candidate
    features (selection.py). A training user's real query is held out (never trained on) when the
    margin is calibrated: it is the one query distributed exactly like a test query.
  - gold (HYDRA's code): the target is the positive, every LLM candidate a negative (pointwise);
  - above-mean: candidates above the query's mean grade are positives (pointwise).
- Adapter, label-set queries (classification/rating, not in HYDRA): a task with a closed label set
  knows the truth of every label for a profile item, so further items become queries whose candidates
  are all the labels, the item's own label the best. They cost no LLM call.

LaMP-7 profile tweets have no input. Their pseudo-input is the LLM's greedy neutral rewrite of the
tweet (pipeline.neutral_input), which mirrors LaMP-7's real inputs (a neutral paraphrase of the
tweet to be written in the user's style); the tweet itself is the target.

Every example names its `sources`: the profile items whose content it carries (the pseudo-query's own
item, the paired item, the items the adapter's prompt was chosen from). Record-level DP
(client/privacy.py) counts with them how many privacy units one item enters.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from statistics import fmean

from . import fit, selection
from .config import MARGIN_AUTO, HydraConfig
from .examples import CandidateGroup, ScoredExample
from .llm.base import LLM
from .llm.pool import fan_out
from .metrics import is_correct, rouge_pair
from .pipeline import messages_for, neutral_input, profile_answers, rerank, sample_candidates
from .records import User
from .retrieval import Retriever
from .scorer import HydraScorer
from .tasks import Task


@dataclass(frozen=True)
class PseudoQuery:
    user_id: str
    item_id: str | None  # the profile item it was made from (None: a training user's real query)
    content: str  # the query's content (what retrieval and the scorers see)
    input: str  # the full task input sent to the LLM
    target: str


def pseudo_queries(task: Task, llm: LLM, user: User, cfg: HydraConfig, real_query: bool = False) -> list[PseudoQuery]:
    """`cfg.pseudo_queries` profile items drawn per user (seeded), plus the real query when `real_query`
    (training users only: their gold is training data, never a test user's). LaMP-7's neutral inputs are
    asked together through the LLM's request pool."""
    rng = random.Random(f"{cfg.seed}:{user.id}")
    items = rng.sample(user.profile, min(cfg.pseudo_queries, len(user.profile)))
    if task.label_field is None:
        contents = fan_out(llm, lambda item: neutral_input(llm, task.item_text(item), cfg.seed), items)
    else:
        contents = [task.item_text(item) for item in items]
    out = [PseudoQuery(user.id, str(item["id"]), content, task.instruction(content), task.item_answer(item))
           for item, content in zip(items, contents)]
    if real_query:
        if user.gold is None:
            raise ValueError(f"user {user.id}: real_query needs a gold answer")
        out.append(PseudoQuery(user.id, None, task.content(user.input), user.input, user.gold))
    return out


def _retrieved(retriever: Retriever, user: User, pq: PseudoQuery, m: int) -> list[dict]:
    exclude = () if pq.item_id is None else (pq.item_id,)
    return retriever.top(user, pq.content, m, exclude_ids=exclude)


def _sources(pq: PseudoQuery, items: list[dict]) -> list[str]:
    """The ids of the profile items an example of `pq` carries: its own item (none for a real query) and `items`."""
    own = [] if pq.item_id is None else [pq.item_id]
    return list(dict.fromkeys(own + [str(i["id"]) for i in items]))


# Each stage is split where the LLM is called: retrieval and the scorers run in the calling thread, in order
# (the scorers' frozen-feature cache and the BM25 indexes are not shared between threads, and the scorers see
# their inputs in the same order whatever the concurrency); the LLM's requests, independent of each other,
# go through the request pool (llm/pool.py), and their answers come back in input order.

def reranker_pairs(retriever: Retriever, user: User, pqs: list[PseudoQuery], cfg: HydraConfig
                   ) -> list[tuple[PseudoQuery, dict]]:
    """(pseudo-query, retrieved item) for each pseudo-query's top-M items: the reranker's rows, in order."""
    return [(pq, item) for pq in pqs for item in _retrieved(retriever, user, pq, cfg.retrieve)]


def one_shot_answer(task: Task, llm: LLM, pq: PseudoQuery, item: dict, cfg: HydraConfig) -> str:
    """The LLM's greedy answer to `pq` with `item` as its only demonstration."""
    messages = messages_for(task, llm, pq.input, [item], cfg.style_or_none, cfg.seed)
    return llm.complete(messages, n=1, temperature=0.0, max_tokens=fit.answer_tokens(task, llm),
                        seed=cfg.seed)[0].strip()


def reranker_labels(task: Task, user: User, pairs: list[tuple[PseudoQuery, dict]], answers: list[str]
                    ) -> list[ScoredExample]:
    """One example per (pseudo-query, retrieved item), labelled by the 1-shot answer it led to."""
    rows: list[tuple[PseudoQuery, dict, float | bool]] = []
    for (pq, item), answer in zip(pairs, answers, strict=True):
        if task.kind == "generation":
            rows.append((pq, item, fmean(rouge_pair(answer, pq.target))))
        else:
            rows.append((pq, item, is_correct(task, answer, pq.target)))
    if task.kind == "generation" and rows:
        mean = fmean(float(r[2]) for r in rows)  # the user's mean over all their rows (HYDRA.md §1.3)
        rows = [(pq, item, float(s) > mean) for pq, item, s in rows]
    return [ScoredExample(user.id, pq.content, task.item_text(item), int(bool(good)), _sources(pq, [item]))
            for pq, item, good in rows]


def reranker_examples(task: Task, llm: LLM, retriever: Retriever, user: User, pqs: list[PseudoQuery],
                      cfg: HydraConfig) -> list[ScoredExample]:
    """One example per (pseudo-query, retrieved item), labelled by the 1-shot answer it leads to."""
    pairs = reranker_pairs(retriever, user, pqs, cfg)
    answers = fan_out(llm, lambda pair: one_shot_answer(task, llm, pair[0], pair[1], cfg), pairs)
    return reranker_labels(task, user, pairs, answers)


@dataclass(frozen=True)
class AdapterPrompt:
    """What the adapter's candidates for one pseudo-query are asked with: its M retrieved items, the k in the prompt."""

    pq: PseudoQuery
    retrieved: list[dict]
    items: list[dict]


def adapter_prompts(task: Task, retriever: Retriever, user: User, pqs: list[PseudoQuery], cfg: HydraConfig,
                    reranker: HydraScorer | None) -> list[AdapterPrompt]:
    """Each pseudo-query's retrieved items and the reranker's top-k of them (no LLM call)."""
    out = []
    for pq in pqs:
        retrieved = _retrieved(retriever, user, pq, cfg.retrieve)
        out.append(AdapterPrompt(pq, retrieved, rerank(reranker, user.id, task, pq.content, retrieved, cfg.k)))
    return out


def adapter_candidates(task: Task, llm: LLM, p: AdapterPrompt, cfg: HydraConfig) -> list[str]:
    """The greedy answer and the B samples for one adapter prompt."""
    messages = messages_for(task, llm, p.pq.input, p.items, cfg.style_or_none, cfg.seed)
    return sample_candidates(task, llm, messages, cfg.candidates, cfg.seed, cfg.temperature)


def adapter_labels(task: Task, user: User, prepared: list[AdapterPrompt], candidates_of: list[list[str]],
                   cfg: HydraConfig) -> list[ScoredExample] | list[CandidateGroup]:
    """The adapter's examples from each prompt's candidates, labelled per `adapter-labels` (no label-set queries)."""
    out: list = []
    for p, candidates in zip(prepared, candidates_of, strict=True):
        pq, retrieved = p.pq, p.retrieved
        src = _sources(pq, retrieved)  # all M: the reranker chose the prompt's k among them
        if cfg.adapter_labels == "graded":  # the candidates the pipeline scores: the LLM's, then the unnamed labels
            texts = selection.with_labels(task, candidates)
            held_out = pq.item_id is None and cfg.margin == MARGIN_AUTO
            history, profile = (([task.item_answer(i) for i in retrieved[:cfg.k]],  # as the pipeline's
                                 profile_answers(task, user, exclude_id=pq.item_id)) if cfg.adapter_history else ([], []))
            feats = selection.candidate_features(task, pq.content, texts, len(candidates), history, profile)
            out.append(CandidateGroup(user.id, pq.content, texts, selection.grades(task, texts, pq.target), feats,
                                      held_out, src))
            continue
        unique = list(dict.fromkeys(candidates))
        if task.kind != "generation":
            out += [ScoredExample(user.id, pq.content, c, int(is_correct(task, c, pq.target)), src) for c in unique]
        elif cfg.adapter_labels == "gold":
            out += [ScoredExample(user.id, pq.content, c, 0, src) for c in unique if c != pq.target.strip()]
            out.append(ScoredExample(user.id, pq.content, pq.target.strip(), 1, src))
        else:
            graded = selection.grades(task, candidates, pq.target)
            mean = fmean(graded)
            out += [ScoredExample(user.id, pq.content, c, int(g > mean), src) for c, g in zip(candidates, graded)]
    return out


def adapter_examples(task: Task, llm: LLM, retriever: Retriever, user: User, pqs: list[PseudoQuery],
                     cfg: HydraConfig, reranker: HydraScorer | None) -> list[ScoredExample] | list[CandidateGroup]:
    """Candidates for each pseudo-query from the prompt with the reranker's top-k items, labelled per `adapter-labels`."""
    prepared = adapter_prompts(task, retriever, user, pqs, cfg, reranker)
    candidates = fan_out(llm, lambda p: adapter_candidates(task, llm, p, cfg), prepared)
    return adapter_labels(task, user, prepared, candidates, cfg) + label_set_examples(task, retriever, user, cfg)


def has_label_set_queries(task: Task, cfg: HydraConfig) -> bool:
    """Whether the adapter gets label-set queries: a closed label set, and adapter-label-queries > 0."""
    return task.kind != "generation" and bool(task.labels) and cfg.adapter_label_queries > 0


def label_set_examples(task: Task, retriever: Retriever, user: User, cfg: HydraConfig) -> list:
    """Classification/rating: `cfg.adapter_label_queries` profile items (seeded) scored against every
    label of the task, the item's own label the right one; no LLM call. [] for generation tasks.
    Graded groups carry the candidate features, with the history of the item's own k BM25 neighbours and the
    rest of the profile.
    Graded: one CandidateGroup per item. Pointwise: the positive repeated so each query's positives weigh
    as much as its negatives (with 1 positive in 15 the heads learn "always negative")."""
    if not has_label_set_queries(task, cfg):
        return []
    rng = random.Random(f"{cfg.seed}:{user.id}:label-set")
    items = rng.sample(user.profile, min(cfg.adapter_label_queries, len(user.profile)))
    out: list = []
    for item in items:
        query, target, src = task.item_text(item), task.item_answer(item), [str(item["id"])]
        labels = list(task.labels)
        if cfg.adapter_labels == "graded":
            near = retriever.top(user, query, cfg.k, exclude_ids=(str(item["id"]),))
            graded = selection.grades(task, labels, target)
            history, profile = (([task.item_answer(i) for i in near], profile_answers(task, user, str(item["id"])))
                                if cfg.adapter_history else ([], []))
            feats = selection.candidate_features(task, query, labels, 0, history, profile)
            src += [str(i["id"]) for i in near]
            out.append(CandidateGroup(user.id, query, labels, graded, feats, sources=src))
            continue
        good = [label for label in labels if is_correct(task, label, target)]
        bad = [label for label in labels if label not in good]
        reps = max(1, len(bad) // max(1, len(good)))
        out += [ScoredExample(user.id, query, label, 1, src) for label in good for _ in range(reps)]
        out += [ScoredExample(user.id, query, label, 0, src) for label in bad]
    return out


def trainable(examples: list) -> list:
    """Examples with a training signal: a group whose candidates all grade the same teaches no ranking."""
    return [e for e in examples if not isinstance(e, CandidateGroup) or max(e.grades) > min(e.grades) or e.held_out]
