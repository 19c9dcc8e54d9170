"""HYDRA's training examples, how a batch of them becomes the scorer's rows, and the loss over those rows.

- `ScoredExample` (pointwise, HYDRA): one (query, text) pair with a 0/1 label, 2-class cross-entropy.
- `CandidateGroup` (listwise, FedHydra's adapter): one query's candidates with graded targets (the
  task metric against the target); the loss is the expected risk of the scorer's choice, sum_i
  softmax(scores)_i * (1 - grade_i) (sequence-level risk, Edunov et al. 2018), so the head learns to
  pick a query's best candidate, not to tell human from LLM text. It replaced a cross-entropy against
  softmax(grades / 0.1): that loss rewards matching the whole grade distribution, and on LaMP-7 its
  optimum (even fitted on the test users) fell below the `closest` rule it can express; the risk's optimum
  is the best pick (README "Results"). Setting adapter-loss "best" swaps it for a cross-entropy (batch_loss).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from . import settings


@dataclass
class ScoredExample:
    """One labelled (query, text) pair of a user: label 1 = positive (useful item / good answer).
    `sources`: ids of the profile items the pair was made from (its pseudo-query's item, the paired or
    prompted items); empty when unknown. Record-level DP counts with them how many units an item enters."""

    user_id: str
    query: str
    text: str
    label: int
    sources: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.user_id, str) or not self.user_id:
            raise ValueError(f"ScoredExample.user_id must be a non-empty string, got {self.user_id!r}")
        if not isinstance(self.query, str) or not isinstance(self.text, str):
            raise TypeError(f"ScoredExample of user {self.user_id!r}: query and text must be strings")
        if self.label not in (0, 1) or isinstance(self.label, float):
            raise ValueError(f"ScoredExample of user {self.user_id!r}: label must be 0 or 1, got {self.label!r}")
        self.label = int(self.label)
        self.sources = [str(s) for s in self.sources]


@dataclass
class CandidateGroup:
    """One query's candidates (texts[0]: the greedy answer, when they come from the LLM), each graded by the
    task metric against the query's target; `features` are the candidates' selection.FEATURES rows.
    `held_out` groups are never trained on: they calibrate the adapter margin. `sources`: as ScoredExample's."""

    user_id: str
    query: str
    texts: list[str]
    grades: list[float]
    features: list[list[float]] = field(default_factory=list)
    held_out: bool = False
    sources: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.user_id, str) or not self.user_id:
            raise ValueError(f"CandidateGroup.user_id must be a non-empty string, got {self.user_id!r}")
        if not self.texts or len(self.grades) != len(self.texts):
            raise ValueError(f"CandidateGroup of user {self.user_id!r}: {len(self.texts)} texts, "
                             f"{len(self.grades)} grades")
        if self.features and len(self.features) != len(self.texts):
            raise ValueError(f"CandidateGroup of user {self.user_id!r}: features for {len(self.features)} of "
                             f"{len(self.texts)} texts")
        self.sources = [str(s) for s in self.sources]


Example = ScoredExample | CandidateGroup


def ranked_queries(examples: list[Example]) -> Counter:
    """Per user, the queries whose examples rank something: a group whose candidates are not all graded alike,
    or a query whose pairs are not all labelled alike. A query whose texts are all equally good or bad teaches a
    head no choice among them, only a shift that every candidate of the query shares. Held-out groups never
    train, so they do not count."""
    labels: dict[tuple[str, str], set[int]] = {}
    out: Counter = Counter()
    for e in examples:
        if isinstance(e, CandidateGroup):
            out[e.user_id] += int(not e.held_out and max(e.grades) > min(e.grades))
        else:
            labels.setdefault((e.user_id, e.query), set()).add(e.label)
    for (user_id, _), seen in labels.items():
        out[user_id] += int(len(seen) > 1)
    return out


def batches(examples: list[Example], order: list[int], batch_size: int) -> list[list[Example]]:
    """Pointwise: `batch_size` examples each. Listwise: whole groups, until a batch holds `batch_size` texts."""
    if isinstance(examples[0], ScoredExample):
        return [[examples[i] for i in order[b:b + batch_size]] for b in range(0, len(order), batch_size)]
    out, current, rows = [], [], 0
    for i in order:
        current.append(examples[i])
        rows += len(examples[i].texts)
        if rows >= batch_size:
            out.append(current)
            current, rows = [], 0
    return out + ([current] if current else [])


def rows_of(batch: list[Example]) -> tuple[list[str], list[str], list[str], list | None]:
    """(user ids, queries, texts, candidate features or None) of every row in the batch."""
    if isinstance(batch[0], ScoredExample):
        return [e.user_id for e in batch], [e.query for e in batch], [e.text for e in batch], None
    users, queries, texts, feats = [], [], [], []
    for g in batch:
        users += [g.user_id] * len(g.texts)
        queries += [g.query] * len(g.texts)
        texts += g.texts
        feats += g.features
    return users, queries, texts, (feats or None)


LISTWISE_LOSSES = settings.SETTINGS["adapter-loss"].choices


def batch_loss(batch: list[Example], logits: torch.Tensor, listwise: str = "risk") -> tuple[torch.Tensor, int]:
    """(mean loss, number of correct items) of a batch's logits [rows, 2]; a listwise item is correct when its
    top-scored candidate has the best grade. `listwise` (setting adapter-loss): "risk", the expected error
    sum_i softmax_i * (1 - grade_i); or "best", -log of the softmax mass on the best-graded candidates (ties
    share it). The risk's gradient vanishes once the softmax sits confidently on a wrong candidate, and Adam
    then moves the feature weights by about lr per step in its sign (Amazon ratings, README); "best"'s does not."""
    if listwise not in LISTWISE_LOSSES:
        raise ValueError(f"unknown listwise loss {listwise!r}; known: {', '.join(LISTWISE_LOSSES)}")
    if isinstance(batch[0], ScoredExample):
        labels = torch.tensor([e.label for e in batch], device=logits.device)
        return F.cross_entropy(logits, labels), int((logits.argmax(-1) == labels).sum())
    scores = logits[:, 1] - logits[:, 0]
    losses, correct, start = [], 0, 0
    for g in batch:
        s = scores[start:start + len(g.texts)]
        start += len(g.texts)
        grades = torch.tensor(g.grades, dtype=s.dtype, device=s.device)
        if listwise == "best":
            losses.append(-torch.logsumexp(F.log_softmax(s, dim=0)[grades >= grades.max()], dim=0))
        else:
            losses.append((F.softmax(s, dim=0) * (1.0 - grades)).sum())
        correct += int(g.grades[int(s.argmax())] >= max(g.grades))
    return torch.stack(losses).mean(), correct
