"""Choosing one answer among an LLM's candidates: the features the adapter sees, the training-free
rules it must beat, the graded targets it learns from, and the margin that keeps the greedy answer.

Candidates are always the greedy answer first, then the samples (pipeline.sample_candidates).
- `similarity`: the task metric between two texts (generation: mean of ROUGE-1 and ROUGE-L F;
  classification: exact match after the metric's postprocessing; rating: 1 - |difference| / 4, graded like
  the MAE, so "4" is nearer "5" than "1" is, agreement is MBR under the MAE and the history feature peaks
  at the user's typical rating).
- `candidate_features`: what the adapter sees besides the encoder state, computed without any gold:
  closeness to the query, agreement with the other candidates (the MBR utility), length relative to the
  query, whether it is the greedy answer, and agreement with the user's own history (the answers of the
  profile items retrieved for the query: on a tagging task, how many of them carry this tag), which LLM
  answers the training-free rules pick (`closest`, `consensus` = mbr), so the learned selector contains each
  rule as a special case and can only fall below one by what it learns wrongly, and (ratings only) `profile`:
  agreement with the ratings of the user's whole profile, the user's scale (harsh or kind), which peaks at
  their median rating, the per-user rule that minimises the MAE over their history, and `frequency`: the share of
  the profile that carries exactly this rating, which peaks at their mode (on 200 Amazon test users the mode rule
  beat the median rule by 0.04 MAE, and with `profile` alone hydra answered the median for 179 of them). On LaMP-7
  closeness predicts a good candidate far better than the per-user signal (MEASUREMENTS.md; README "Results");
  on a classification task whose users label alike items alike, the history is the personal signal.
- training-free rules over the same candidates: `mbr` (most agreement), `closest` (closest to the query);
  `oracle` needs the gold and is a diagnostic upper bound only.
- `pick`: the adapter's choice: the best-scoring candidate replaces greedy only when its score beats
  greedy's by more than the margin (None: never). A rating (setting rating-answer "median") answers the
  candidate of least expected absolute error under the adapter's softmax instead (`least_expected_error`).
- margin calibration: `margin_sums` are additive sums per margin over held-out training queries (so
  federated clients can return them), `pick_margin` chooses from their total.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from .metrics import is_correct, label_index, rating_error, rating_value, rouge_pair
from .tasks import Task

FEATURES = ("closeness", "agreement", "length", "greedy", "history", "closest", "consensus", "profile", "frequency")
MARGINS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)  # in adapter score units (log-odds)
RULES = ("mbr", "closest")
RATING_SPAN = 4.0  # the widest error on a 1-5 scale


def _rating_closeness(error: float) -> float:
    """1 for the same rating, 0 for the ends of the scale apart: the MAE's distance as a similarity."""
    return max(0.0, 1.0 - error / RATING_SPAN)


def similarity(task: Task, a: str, b: str) -> float:
    """How much two answers agree, symmetric (generation: ROUGE mix; otherwise: the same parsed label or rating)."""
    if task.kind == "generation":
        r1, rl = rouge_pair(a, b)
        return (r1 + rl) / 2
    if task.kind == "rating":
        va, vb = rating_value(a), rating_value(b)
        return 0.0 if va is None or vb is None else _rating_closeness(abs(va - vb))
    ia = label_index(task, a)
    return float(ia >= 0 and ia == label_index(task, b))


def grades(task: Task, texts: Sequence[str], target: str) -> list[float]:
    """Each candidate's task metric against the target: the adapter's graded training signal (a rating: 1 - its
    absolute error / 4, so the adapter learns to be near when it cannot be right)."""
    if task.kind == "generation":
        return [similarity(task, t, target) for t in texts]
    if task.kind == "rating":
        return [_rating_closeness(rating_error(t, target)) for t in texts]
    return [float(is_correct(task, t, target)) for t in texts]


def _words(text: str) -> int:
    return len(text.split())


def with_labels(task: Task, candidates: Sequence[str]) -> list[str]:
    """The LLM's candidates, then (closed-label tasks) every label none of them names: FedHydra's adapter may answer
    any label of a classification or rating task, with the LLM's votes as a feature. Generation: unchanged."""
    if task.kind == "generation" or not task.labels:
        return list(candidates)
    return list(candidates) + [label for label in task.labels
                               if not any(similarity(task, c, label) >= 1.0 for c in candidates)]


def _profile_features(task: Task, text: str, profile: Counter) -> tuple[float, float]:
    """A candidate's mean similarity to the answers of the user's profile, and the share of them it equals
    (each counted once per distinct answer)."""
    total = sum(profile.values())
    if not total:
        return 0.0, 0.0
    sims = {a: similarity(task, text, a) for a in profile}
    return (sum(n * sims[a] for a, n in profile.items()) / total,
            sum(n for a, n in profile.items() if sims[a] >= 1.0) / total)


def candidate_features(task: Task, query: str, texts: Sequence[str], sampled: int | None = None,
                       history: Sequence[str] = (), profile: Sequence[str] = ()) -> list[list[float]]:
    """One row of FEATURES per candidate. texts[0] is the greedy answer and texts[:sampled] come from the LLM (the
    rest are labels added by with_labels): agreement is the share of the *other LLM* answers that agree.
    `history`: the answers of the user's profile items retrieved for the query (pipeline.history_answers);
    the history feature is a candidate's mean similarity to them (0 without history). `closest` and `consensus`
    mark the LLM answer the rules of the same names pick (1 for it, 0 for every other row). `profile`: the
    answers of the user's whole profile (pipeline.profile_answers); on a rating task the profile feature is a
    candidate's mean similarity to them, and the frequency feature the share of them it equals. Both are 0 on
    other tasks, which they have not been measured on: ROUGE against a whole profile of texts costs
    |profile| x candidates scorings per query, and a zero column never moves its zero-initialised weight, so
    LaMP-7 and the tagging tasks train exactly as before."""
    n, m = len(texts), len(texts) if sampled is None else sampled
    sims = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if i < m:  # only agreement with an LLM answer counts
                sims[i][j] = sims[j][i] = similarity(task, texts[i], texts[j])
    rows = []
    for i, text in enumerate(texts):
        others = [j for j in range(m) if j != i]
        agreement = sum(sims[i][j] for j in others) / len(others) if others else 0.0
        closeness = similarity(task, text, query) if task.kind == "generation" else 0.0
        length = math.log((_words(text) + 1) / (_words(query) + 1)) if task.kind == "generation" else 0.0
        own = sum(similarity(task, text, h) for h in history) / len(history) if history else 0.0
        rows.append([closeness, agreement, length, 1.0 if i == 0 and m > 0 else 0.0, own])
    # the rules' picks among the LLM answers (none without one), ties to the earlier: greedy first
    near = max(range(m), key=lambda j: (rows[j][0], -j)) if m else -1
    voted = max(range(m), key=lambda j: (rows[j][1], -j)) if m else -1
    counts = Counter(profile) if task.kind == "rating" else Counter()
    for i, row in enumerate(rows):
        row += [float(i == near), float(i == voted), *_profile_features(task, texts[i], counts)]
    return rows


def _rule_pick(task: Task, query: str, texts: Sequence[str], rule: str) -> int:
    feats = candidate_features(task, query, texts)
    return next(i for i, row in enumerate(feats) if row[FEATURES.index(rule)])


def mbr(task: Task, query: str, texts: Sequence[str]) -> int:
    """The candidate that agrees most with the others (ties: the earlier, so greedy first)."""
    return _rule_pick(task, query, texts, "consensus")


def closest(task: Task, query: str, texts: Sequence[str]) -> int:
    """The candidate closest to the query (ties: the earlier; classification has no closeness: greedy)."""
    return _rule_pick(task, query, texts, "closest")


def oracle(task: Task, texts: Sequence[str], gold: str) -> int:
    """The best candidate by the gold: a diagnostic upper bound, never a method."""
    g = grades(task, texts, gold)
    return max(range(len(texts)), key=lambda j: (g[j], -j))


def pick(scores: Sequence[float], margin: float | None, values: Sequence[int | None] | None = None) -> int:
    """Greedy (index 0) unless the best-scoring candidate beats it by more than `margin` (None: never).
    `values` (decision_values: a rating task's candidates as numbers): the candidate whose expected absolute error
    under softmax(scores) is least, whatever the margin (None still keeps greedy)."""
    if margin is None or len(scores) < 2:
        return 0
    if values is not None:
        return least_expected_error(scores, values)
    best = max(range(len(scores)), key=lambda j: (scores[j], -j))
    return best if scores[best] - scores[0] > margin else 0


def decision_values(task: Task, texts: Sequence[str], rating_answer: str) -> list[int | None] | None:
    """The candidates as ratings when a rating task answers by least expected error (setting rating-answer
    "median"); None otherwise (the top score decides)."""
    if task.kind != "rating" or rating_answer != "median":
        return None
    return [rating_value(t) for t in texts]


def least_expected_error(scores: Sequence[float], values: Sequence[int | None]) -> int:
    """The candidate v minimising sum_j p_j |v_j - v| with p = softmax(scores) over the candidates that hold a
    number: the weighted median, the Bayes decision for the MAE. The adapter's softmax is what its listwise loss
    trains, and the candidates of one rating repeat (the LLM's samples, then with_labels), so their mass adds up;
    its top candidate is the mode instead, which the MAE does not reward. Ties: the higher score, then the earlier."""
    rated = [j for j, v in enumerate(values) if v is not None]
    if not rated:
        return max(range(len(scores)), key=lambda j: (scores[j], -j))
    top = max(scores[j] for j in rated)
    weight = {j: math.exp(scores[j] - top) for j in rated}
    return min(rated, key=lambda i: (sum(w * abs(values[j] - values[i]) for j, w in weight.items()), -scores[i], i))


def margin_sums(scores: Sequence[float], graded: Sequence[float],
                values: Sequence[int | None] | None = None) -> dict[str, float]:
    """One held-out query's contribution: the grade each margin's choice gets, plus the greedy grade and a count."""
    out = {f"margin:{m:g}": float(graded[pick(scores, m, values)]) for m in MARGINS}
    out["margin:off"] = float(graded[0])
    out["queries"] = 1.0
    return out


def add_sums(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in set(a) | set(b)}


def pick_margin(sums: dict[str, float]) -> dict:
    """The margin whose choices scored best in total on held-out queries. Ties go to the smaller margin: the
    adapter's own choice (margin 0) already weighs the greedy answer through its `greedy` feature, and a
    margin corrects it only where held-out queries show it is too eager. With a handful of held-out queries
    (the demo: 6) the adapter often agrees with greedy on all of them; on synthetic LaMP-2M with 4 held-out
    queries, ties to "off" kept hydra at greedy's 3 of 6 test users, margin 0 made 6 of 6.
    Without held-out queries: off."""
    queries = int(sums.get("queries", 0))
    if queries == 0:
        return {"margin": "off", "queries": 0, "mean": {}}
    means = {k.split(":", 1)[1]: v / queries for k, v in sums.items() if k.startswith("margin:")}
    order = [f"{m:g}" for m in MARGINS] + ["off"]
    best = max(order, key=lambda m: (round(means.get(m, -1.0), 9), -order.index(m)))
    return {"margin": best if best == "off" else float(best), "queries": queries, "mean": means}
