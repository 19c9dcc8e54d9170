"""LaMP's metrics, computed the way HYDRA's and LaMP's metric code computes them (HYDRA.md §5.2).

Sources (read in the public repositories):
- HYDRA `metrics/classification_metrics.py` (night-chen/HYDRA@4ec1508): `postprocess_text_cls`,
  `extract_numbers`, `create_metric_f1_accuracy_chatgpt`, `create_metric_mae_rmse_chatgpt`.
- LaMP `LaMP/metrics/generation_metrics.py` (`create_metric_bleu_rouge_meteor_chatgpt`) and
  `LaMP/metrics/classification_metrics.py` (LaMP-Benchmark/LaMP@de78cdb).

What each task kind reports (`evaluate` returns exactly `task.metrics`):
- classification (LaMP_1, LaMP_2N, LaMP_2M): `accuracy` and macro `f1` over
  `labels=range(len(task.labels))`, with sklearn's `f1_score(average="macro", labels=...,
  zero_division=0)` semantics: a label absent from both predictions and golds scores 0, and a
  prediction outside the label set (index -1) counts against the gold's label only.
  Postprocessing of a prediction (HYDRA's `postprocess_text_cls`): lowercase and strip; cut
  before the first "," and then before the first "!"; if "]" is present keep the text up to
  and including the first "]". Nothing is stripped again after the cuts ("comedy !" -> "comedy ")
  and no final period is removed ("Comedy." does not match "comedy"). Golds get the same
  treatment without the "]" rule. A gold outside the label set is refused (ValueError): it
  means the wrong task or a broken file, and LaMP would silently count it as a -1 == -1 hit.
- rating (LaMP_3): `mae` and `rmse`. The first run of digits (`re.findall(r"\\d+")`) of the
  stripped prediction and gold is the value, so "I'd say 4 stars" is 4 and "4.5" is 4. A
  prediction without a digit becomes whichever of 1 and 5 is farther from the gold, ties
  (gold 3) going to 5, exactly as `abs(1 - y) > abs(5 - y)` decides in LaMP's code. A gold
  without a digit is refused.
- generation (LaMP_4, LaMP_5, LaMP_7): `rouge-1` and `rouge-L` are the mean over examples of
  rouge-score's F-measure (`RougeScorer(["rouge1", "rougeL"], use_stemmer=False)`, its default
  tokenizer). LaMP calls `evaluate.load("rouge")`, whose default aggregator is rouge-score's
  `BootstrapAggregator`; its "mid" value is the median of bootstrap resample means, a random
  estimate of this same mean, which we compute exactly. `bleu` is
  `sacrebleu.corpus_bleu(predictions, [golds]).score` on sacrebleu's 0-100 scale, the call
  `evaluate.load("sacrebleu")` makes with its defaults. METEOR is omitted: it needs NLTK data
  (WordNet) downloaded at run time, and HYDRA reports only R-1, R-L and BLEU.
Predictions and golds are stripped first, as LaMP does.

Differences from LaMP's own leaderboard script (LaMP `eval/evaluation.py`), for the record: it
only strips (no lowercase, no "," / "!" / "]" cuts) and reads a rating with `float()` of the
whole stripped text. HYDRA's rules above are the ones its reported numbers used; on
well-formed outputs ("comedy", "4") both give the same result.

The `evaluate` package is not used: it fetches metric code from a hub at run time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import lru_cache

from .tasks import Task, get_task

_DIGITS = re.compile(r"\d+")


def _task(task: Task | str) -> Task:
    return get_task(task) if isinstance(task, str) else task


def _check_text(what: str, text: object) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}: {text!r}")
    return text


# ---------------------------------------------------------------- classification


def _cut(text: str, *, bracket_rule: bool) -> str:
    """HYDRA's `postprocess_text_cls` for one string (the "]" rule applies to predictions only)."""
    text = text.lower().strip()
    if "," in text:
        text = text.split(",")[0]
    if "!" in text:
        text = text.split("!")[0]
    if bracket_rule and "]" in text:
        text = text.split("]")[0] + "]"
    return text


def normalize_label(task: Task | str, text: str, *, gold: bool = False) -> str:
    """A prediction (or, with `gold=True`, a gold) after the task's metric postprocessing.

    Classification: HYDRA's cuts (module docstring). Rating: the first integer as a string, or
    "" when the text has no digit. Generation tasks have no label: ValueError.
    """
    task = _task(task)
    text = _check_text("label text", text)
    if task.kind == "classification":
        return _cut(text, bracket_rule=not gold)
    if task.kind == "rating":
        value = rating_value(text)
        return "" if value is None else str(value)
    raise ValueError(f"{task.name} is a generation task: it has no labels, score it with rouge_pair")


def label_index(task: Task | str, text: str, *, gold: bool = False) -> int:
    """Index in `task.labels` of the postprocessed text, or -1 when it is not a label."""
    task = _task(task)
    normalized = normalize_label(task, text, gold=gold)
    try:
        return task.labels.index(normalized)
    except ValueError:
        return -1


def _gold_index(task: Task, gold: str, position: int | None = None) -> int:
    index = label_index(task, gold, gold=True)
    if index < 0:
        where = "" if position is None else f" at position {position}"
        raise ValueError(
            f"{task.name}: gold {gold!r}{where} is not one of the task's labels "
            f"({', '.join(task.labels)})"
        )
    return index


def macro_f1(predicted: Sequence[int], gold: Sequence[int], n_labels: int) -> float:
    """Macro F1 over labels 0..n_labels-1 (sklearn `f1_score(average="macro", zero_division=0)`).

    Per label F = 2tp / (2tp + fp + fn), 0 when the label is absent from both sides; values
    outside 0..n_labels-1 (such as -1) are never a label of their own.
    """
    tp = [0] * n_labels
    fp = [0] * n_labels
    fn = [0] * n_labels
    for p, g in zip(predicted, gold, strict=True):
        if p == g:
            if 0 <= p < n_labels:
                tp[p] += 1
            continue
        if 0 <= p < n_labels:
            fp[p] += 1
        if 0 <= g < n_labels:
            fn[g] += 1
    scores = [(2 * t / (2 * t + a + b)) if (2 * t + a + b) else 0.0 for t, a, b in zip(tp, fp, fn)]
    return sum(scores) / n_labels


# ---------------------------------------------------------------- rating


def rating_value(text: str) -> int | None:
    """The first integer in the stripped text ("I'd say 4 stars" -> 4), or None without a digit."""
    found = _DIGITS.findall(_check_text("rating text", text).strip())
    return int(found[0]) if found else None


def _rating_pair(prediction: str, gold: str, position: int | None = None) -> tuple[float, float]:
    """(prediction value, gold value) with LaMP's fallback for a prediction without a number."""
    y = rating_value(gold)
    if y is None:
        where = "" if position is None else f" at position {position}"
        raise ValueError(f"LaMP_3 gold {gold!r}{where} holds no number")
    x = rating_value(prediction)
    if x is None:
        # LaMP: the extreme farther from the gold; at gold 3 the tie goes to 5.
        x = 1 if abs(1 - y) > abs(5 - y) else 5
    return float(x), float(y)


def rating_error(prediction: str, gold: str) -> float:
    """One answer's absolute error, as LaMP's MAE counts it (a prediction without a number: the farther extreme)."""
    x, y = _rating_pair(prediction, gold)
    return abs(x - y)


# ---------------------------------------------------------------- generation


@lru_cache(maxsize=1)
def _rouge_scorer():
    import logging

    from rouge_score import rouge_scorer

    # The scorer logs "Using default tokenizer." through absl, which makes the root logger's first record call
    # logging.basicConfig: a root handler that prints every Flower log line a second time.
    handlers = list(logging.root.handlers)
    try:
        return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    finally:
        logging.root.handlers[:] = handlers


def rouge_pair(prediction: str, gold: str) -> tuple[float, float]:
    """(ROUGE-1 F, ROUGE-L F) of one stripped prediction against its stripped gold."""
    prediction = _check_text("prediction", prediction).strip()
    gold = _check_text("gold", gold).strip()
    scores = _rouge_scorer().score(gold, prediction)  # rouge-score's order: (target, prediction)
    return scores["rouge1"].fmeasure, scores["rougeL"].fmeasure


def corpus_bleu(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0-100) of stripped predictions against one stripped gold each."""
    import sacrebleu

    preds = [_check_text("prediction", p).strip() for p in predictions]
    refs = [_check_text("gold", g).strip() for g in golds]
    return float(sacrebleu.corpus_bleu(preds, [refs]).score)


# ---------------------------------------------------------------- the entry points


def is_correct(task: Task | str, prediction: str, gold: str) -> bool:
    """Exact match after the task's metric postprocessing (classification and rating only).

    A prediction without a number never matches a rating: LaMP maps it to the extreme farther
    from the gold. Generation tasks have no notion of correct: ValueError (use `rouge_pair`).
    """
    task = _task(task)
    prediction = _check_text("prediction", prediction)
    gold = _check_text("gold", gold)
    if task.kind == "classification":
        return label_index(task, prediction) == _gold_index(task, gold)
    if task.kind == "rating":
        x, y = _rating_pair(prediction, gold)
        return x == y
    raise ValueError(f"{task.name} is a generation task: there is no exact match, score it with rouge_pair")


def _check_pairs(predictions: Sequence[str], golds: Sequence[str]) -> None:
    if isinstance(predictions, str) or isinstance(golds, str):
        raise ValueError("predictions and golds must be lists of strings, not a single string")
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} golds: they must pair up one to one")
    if not predictions:
        raise ValueError("no predictions to evaluate: the lists are empty")
    for i, (p, g) in enumerate(zip(predictions, golds)):
        _check_text(f"prediction at position {i}", p)
        _check_text(f"gold at position {i}", g)


def metric_stats(task: Task | str, predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """Additive sufficient statistics of the task's metrics: summing them over disjoint groups of
    users (e.g. federated clients) and passing the sum to `metrics_from_stats` gives exactly the
    metrics of all the users together (macro F1 and corpus BLEU included)."""
    task = _task(task)
    _check_pairs(predictions, golds)
    stats = {"n": float(len(predictions))}
    if task.kind == "classification":
        for i, (p, g) in enumerate(zip(predictions, golds)):
            gi, pi = _gold_index(task, g, i), label_index(task, p)
            stats["correct"] = stats.get("correct", 0.0) + (pi == gi)
            if pi == gi:
                _add(stats, f"tp-{pi}", 1)
            else:
                if pi >= 0:
                    _add(stats, f"fp-{pi}", 1)
                _add(stats, f"fn-{gi}", 1)
        return stats
    if task.kind == "rating":
        for i, (p, g) in enumerate(zip(predictions, golds)):
            x, y = _rating_pair(p, g, i)
            _add(stats, "abs-error", abs(x - y))
            _add(stats, "squared-error", (x - y) ** 2)
        return stats
    for p, g in zip(predictions, golds):
        r1, rl = rouge_pair(p, g)
        _add(stats, "rouge-1", r1)
        _add(stats, "rouge-L", rl)
    import sacrebleu

    bleu = sacrebleu.corpus_bleu([p.strip() for p in predictions], [[g.strip() for g in golds]])
    for n, (c, t) in enumerate(zip(bleu.counts, bleu.totals)):
        stats[f"bleu-correct-{n}"], stats[f"bleu-total-{n}"] = float(c), float(t)
    stats["bleu-sys-len"], stats["bleu-ref-len"] = float(bleu.sys_len), float(bleu.ref_len)
    return stats


def _add(stats: dict[str, float], key: str, value: float) -> None:
    stats[key] = stats.get(key, 0.0) + float(value)


def add_stats(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in a.keys() | b.keys()}


def metrics_from_stats(task: Task | str, stats: dict[str, float]) -> dict[str, float]:
    """The task's LaMP metrics from (summed) `metric_stats`."""
    task = _task(task)
    n = stats.get("n", 0.0)
    if n <= 0:
        raise ValueError("no predictions to evaluate: the statistics cover 0 users")
    if task.kind == "classification":
        f1 = []
        for i in range(len(task.labels)):
            t, a, b = (stats.get(f"{k}-{i}", 0.0) for k in ("tp", "fp", "fn"))
            f1.append(2 * t / (2 * t + a + b) if (2 * t + a + b) else 0.0)
        return {"accuracy": stats.get("correct", 0.0) / n, "f1": sum(f1) / len(task.labels)}
    if task.kind == "rating":
        return {"mae": stats["abs-error"] / n, "rmse": math.sqrt(stats["squared-error"] / n)}
    from sacrebleu.metrics import BLEU

    ref = BLEU()
    bleu = BLEU.compute_bleu([int(stats[f"bleu-correct-{i}"]) for i in range(4)],
                             [int(stats[f"bleu-total-{i}"]) for i in range(4)],
                             int(stats["bleu-sys-len"]), int(stats["bleu-ref-len"]),
                             smooth_method=ref.smooth_method, smooth_value=ref.smooth_value,
                             effective_order=ref.effective_order)
    return {"rouge-1": stats["rouge-1"] / n, "rouge-L": stats["rouge-L"] / n, "bleu": float(bleu.score)}


def evaluate(task: Task | str, predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """The task's LaMP metrics (keys: `task.metrics`) of predictions against golds, paired by position."""
    return metrics_from_stats(task, metric_stats(task, predictions, golds))
