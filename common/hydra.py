"""HYDRA's stages over a group of users, for one place that holds their data (a whole centralized
run, or one federated client).

- train: labels from the users' history, then base + their heads (+ the shared default head)
  trained together, reranker first, so the adapter's prompts use the trained reranker's top-k;
- calibrate: the adapter margin, from held-out training queries (selection.py);
- fit: unseen users, base frozen, heads (of the scorers in `fit-heads`) started from the default head and fitted on
  their own history; a user whose history ranks fewer than `fit-min-queries` queries keeps the default head.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import labels, selection, training
from .config import MARGIN_AUTO, MARGIN_OFF, HydraConfig
from .examples import CandidateGroup, ranked_queries
from .llm.base import LLM
from .protocol import ADAPTER, BASE_PART, HEAD_PART, MODULES, RERANKER, array_key, split_array_key
from .llm.pool import fan_out
from .llm.progress import LLMProgress
from .records import User
from .retrieval import Retriever
from .scorer import HydraScorer
from .tasks import Task

Say = Callable[[str], None]


@dataclass
class HydraModels:
    """The two scorers: each a shared base plus one head per user and a default head."""

    reranker: HydraScorer
    adapter: HydraScorer

    @classmethod
    def new(cls, cfg: HydraConfig, device: str | None = None) -> "HydraModels":
        def make(extra: int) -> HydraScorer:
            return HydraScorer(cfg.encoder or None, train_layers=cfg.train_layers, head_layers=cfg.head_layers,
                               max_length=cfg.max_length, device=device, extra=extra, feature_lr=cfg.feature_lr)
        # The default head is initialised at construction: seed it, or reruns differ (and miss the LLM cache).
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            return use_run_settings(cls(make(0), make(adapter_features(cfg))), cfg)


def use_run_settings(models: HydraModels, cfg: HydraConfig) -> HydraModels:
    """Give models (new, or loaded from a file, which keeps no training settings) the run's feature learning rate
    and listwise loss."""
    if models.adapter.candidate_weights is not None:
        models.adapter.candidate_weights.fixed_lr = cfg.feature_lr
    models.adapter.listwise_loss = cfg.adapter_loss
    return models


def adapter_features(cfg: HydraConfig) -> int:
    """The graded adapter's heads see the candidate features; HYDRA's pointwise recipes do not."""
    return len(selection.FEATURES) if cfg.adapter_labels == "graded" else 0


def release_memory() -> None:
    """Hand freed memory back to the OS between stages. glibc keeps freed heap pages of a finished stage
    (training activations, feature caches); without this, each stage starts from the last one's peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def optim_args(cfg: HydraConfig, stage: str = "train") -> dict:
    """The optimiser arguments of the train or the fit stage (they differ in epochs only)."""
    return dict(epochs=cfg.fit_epochs if stage == "fit" else cfg.epochs, lr=cfg.lr, head_lr=cfg.head_lr,
                batch_size=cfg.batch_size, weight_decay=cfg.weight_decay)


def make_labels(task: Task, llm: LLM, retriever: Retriever, users: list[User], cfg: HydraConfig,
                reranker: HydraScorer | None, which: str, real_queries: bool, say: Say | None = None) -> list:
    """Reranker (`which=RERANKER`) or adapter examples for `users`, made from their history, in user order.

    The LLM's requests of all users go through its request pool together (llm/pool.py); retrieval and the
    reranker run here, user after user, so the examples are the same whatever the pool's size."""
    pqs = _through_pool(llm, lambda u: labels.pseudo_queries(task, llm, u, cfg, real_query=real_queries), users,
                        f"{which} pseudo-queries", "user", say)
    out = []
    if which == RERANKER:
        pairs = [labels.reranker_pairs(retriever, u, p, cfg) for u, p in zip(users, pqs)]
        answers = _through_pool(llm, lambda pair: labels.one_shot_answer(task, llm, pair[0], pair[1], cfg),
                                [pair for ps in pairs for pair in ps], "reranker labels", "prompt", say)
        for u, ps in zip(users, pairs):
            out += labels.reranker_labels(task, u, ps, answers[:len(ps)])
            answers = answers[len(ps):]
    else:
        prepared = [labels.adapter_prompts(task, retriever, u, p, cfg, reranker) for u, p in zip(users, pqs)]
        candidates = _through_pool(llm, lambda p: labels.adapter_candidates(task, llm, p, cfg),
                                   [p for ps in prepared for p in ps], "adapter labels", "prompt", say)
        for u, ps in zip(users, prepared):
            out += labels.adapter_labels(task, u, ps, candidates[:len(ps)], cfg)
            out += labels.label_set_examples(task, retriever, u, cfg)
            candidates = candidates[len(ps):]
    return labels.trainable(out)


def _through_pool(llm: LLM, fn: Callable, items: list, what: str, unit: str, say: Say | None) -> list:
    """fan_out with the stage's progress (done, the LLM's requests per second, time left)."""
    with LLMProgress(llm.stats, len(items), what, unit, say) as progress:
        def step(item):
            result = fn(item)
            progress.step()
            return result
        return fan_out(llm, step, items)


def train(task: Task, llm: LLM, users: list[User], cfg: HydraConfig, models: HydraModels,
          say: Say | None = None, label_users: list[User] = ()) -> dict:
    """The train stage on `users` (then the margin, when it is calibrated); returns per-module training metrics.
    `label_users` (closed-label tasks): further users whose history adds only the adapter's label-set queries,
    which cost no LLM call; they train the shared adapter (and heads of their own) beside `users`."""
    if label_users and not labels.has_label_set_queries(task, cfg):
        raise ValueError(f"label users give only label-set queries, which {task.name} does not have here (a task with "
                         "a closed label set and adapter-label-queries > 0 does)")
    retriever, report = Retriever(task), {}
    for which in MODULES:
        model = getattr(models, which)
        examples = make_labels(task, llm, retriever, users, cfg, models.reranker, which,
                               cfg.include_train_queries, say)
        if which == ADAPTER and label_users:
            examples += [e for u in label_users for e in labels.label_set_examples(task, retriever, u, cfg)]
            if say:
                say(f"adapter: {len(examples)} examples with the label-set queries of {len(label_users)} label users")
        if not [e for e in examples if not getattr(e, "held_out", False)]:  # e.g. short titles: all ROUGE 0
            raise ValueError(f"{which} labels: no query of the {len(users)} training users ranks its candidates "
                             "(every one graded alike, or none made); use more users, pseudo-queries or candidates")
        report[which] = training.train_stage(model, examples, seed=cfg.seed, say=say, **optim_args(cfg))
        if which == ADAPTER and cfg.margin == MARGIN_AUTO:
            report["calibration"] = selection.pick_margin(calibration_sums(task, models.adapter, examples, cfg))
        model.clear_cache()  # the frozen-feature cache pays off across epochs only; free it for what follows
        release_memory()
    return report


def calibration_sums(task: Task, adapter: HydraScorer, examples: list, cfg: HydraConfig) -> dict[str, float]:
    """selection.margin_sums over the held-out groups, scored with their users' trained heads."""
    sums: dict[str, float] = {}
    for g in examples:
        if isinstance(g, CandidateGroup) and g.held_out:
            scores = adapter.log_odds(g.user_id, g.query, g.texts, g.features if adapter.extra else None)
            values = selection.decision_values(task, g.texts, cfg.rating_answer)
            sums = selection.add_sums(sums, selection.margin_sums(scores, g.grades, values))
    return sums


def resolve_margin(cfg: HydraConfig, calibrated: float | str | None = None) -> float | None:
    """The margin answers use: None (always greedy) for off, the calibrated value for auto, else the number."""
    margin = cfg.margin if cfg.margin != MARGIN_AUTO else calibrated
    if margin is None:
        raise ValueError("adapter-margin is auto but no calibrated margin was given")
    return None if margin == MARGIN_OFF else float(margin)


def fit(task: Task, llm: LLM, users: list[User], cfg: HydraConfig, models: HydraModels,
        say: Say | None = None) -> dict:
    """The fit stage: each user's heads of the scorers in `cfg.fit_modules` start from the default head and fit on their
    history; the bases stay frozen."""
    retriever, report = Retriever(task), {}
    for which in cfg.fit_modules:
        model = getattr(models, which)
        examples = make_labels(task, llm, retriever, users, cfg, models.reranker, which, False, say)
        report[which] = fit_heads(model, examples, [u.id for u in users], cfg, which, say)
        model.clear_cache()
        release_memory()
    return report


def fit_heads(model: HydraScorer, examples: list, user_ids: list[str], cfg: HydraConfig, which: str = "",
              say: Say | None = None) -> dict:
    """Fit the heads of the users (of `user_ids`) whose examples rank at least `fit-min-queries` queries (capped at
    pseudo-queries), each started from the default head; every other user answers with the default head (a head
    they had is removed). Returns fit_stage's report (none when no user qualifies) with how many users got a head."""
    need, ranked = min(cfg.fit_min_queries, cfg.pseudo_queries), ranked_queries(examples)
    present = {e.user_id for e in examples}
    fitted = {u for u in user_ids if u in present and ranked[u] >= need}
    for u in set(user_ids) - fitted:
        model.remove_user(u)
    report = (training.fit_stage(model, [e for e in examples if e.user_id in fitted], seed=cfg.seed, init="default",
                                 say=say, **optim_args(cfg, "fit")) if fitted else {})
    rest = len(user_ids) - len(fitted)
    report |= {"heads_fitted": len(fitted), "default_head_users": rest}
    if say:
        has, keeps = ("has", "keeps") if rest == 1 else ("have", "keep")
        thin = f"; the other {rest} {has} fewer than {need} ranked queries and {keeps} the default head" if rest else ""
        say(f"{which or 'fit'}: {len(fitted)} of {len(user_ids)} new users get a head of their own{thin}")
    return report


# ---------------------------------------------------------------- what federation moves
def shared_arrays(models: HydraModels, modules: tuple[str, ...] = MODULES) -> dict[str, torch.Tensor]:
    """The shared part of `modules`, keyed "<module>/base/<param>" and "<module>/default-head/<param>":
    the trainable base layers, and the default head, which like the base is trained on every
    training user and serves users without a head of their own. No user's head is ever included."""
    out = {}
    for name in modules:
        model = getattr(models, name)
        out |= {array_key(name, BASE_PART, k): v for k, v in model.shared_state().items()}
        out |= {array_key(name, HEAD_PART, k): v for k, v in model.default_head_state().items()}
    return out


def load_shared_arrays(models: HydraModels, arrays: dict) -> tuple[str, ...]:
    """Load what shared_arrays() made (any subset of modules, torch or numpy values); returns the modules
    it held. Any other key is an error: a payload must carry exactly these parameters."""
    by_module: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in arrays.items():
        module, part, param = split_array_key(key)
        by_module.setdefault(module, {}).setdefault(part, {})[param] = torch.as_tensor(value)
    for module, parts in by_module.items():
        model = getattr(models, module)
        model.load_shared_state(parts.get(BASE_PART, {}))
        model.load_default_head_state(parts.get(HEAD_PART, {}))
    return tuple(m for m in MODULES if m in by_module)


def digest(arrays: dict) -> str:
    """Identifies a set of shared arrays (a client checks it holds the reranker the adapter rounds assume)."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(np.asarray(arrays[key], dtype=np.float32)).tobytes())
    return h.hexdigest()[:16]
