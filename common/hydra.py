"""HYDRA's two stages over a group of users, for one place that holds their data (a whole
centralized run, or one federated client).

- train: labels from the users' history, then base + their heads (+ the shared default head)
  trained together, reranker first, so the adapter's prompts use the trained reranker's top-k;
- fit: unseen users, base frozen, fresh heads on their own history only.
"""

from __future__ import annotations

import ctypes
import gc
from dataclasses import dataclass

import torch
from tqdm import tqdm

from . import labels, training
from .config import HydraConfig
from .llm.base import LLM
from .records import User
from .retrieval import Retriever
from .scorer import HydraScorer
from .tasks import Task


@dataclass
class HydraModels:
    """The two scorers: each a shared base plus one head per user and a default head."""

    reranker: HydraScorer
    adapter: HydraScorer

    @classmethod
    def new(cls, cfg: HydraConfig, encoder: str | None = None, device: str | None = None) -> "HydraModels":
        def make() -> HydraScorer:
            # 128 MB of frozen features per scorer holds the cpu preset's pairs (64 MB measured: same peak RSS)
            return HydraScorer(encoder, train_layers=cfg.train_layers, head_layers=cfg.head_layers,
                               max_length=cfg.max_length, device=device, cache_mb=128)
        # The default head is initialised at construction: seed it, or reruns differ (and miss the LLM cache).
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            return cls(make(), make())


def release_memory() -> None:
    """Hand freed memory back to the OS between stages. glibc keeps freed heap pages of a finished stage
    (training activations, feature caches); without this, each stage starts from the last one's peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def _optim_args(cfg: HydraConfig, progress: bool) -> dict:
    return dict(epochs=cfg.epochs, lr=cfg.lr, head_lr=cfg.head_lr, batch_size=cfg.batch_size,
                weight_decay=cfg.weight_decay, seed=cfg.seed, progress=progress)


def make_labels(task: Task, llm: LLM, retriever: Retriever, users: list[User], cfg: HydraConfig,
                reranker: HydraScorer | None, which: str, real_queries: bool, progress: bool = True):
    """Reranker (`which="reranker"`) or adapter examples for `users`, made from their history."""
    out = []
    for user in tqdm(users, desc=f"{which} labels", unit="user", disable=not progress):
        pqs = labels.pseudo_queries(task, llm, user, cfg, real_query=real_queries)
        if which == "reranker":
            out += labels.reranker_examples(task, llm, retriever, user, pqs, cfg)
        else:
            out += labels.adapter_examples(task, llm, retriever, user, pqs, cfg, reranker)
    return out


def train(task: Task, llm: LLM, users: list[User], cfg: HydraConfig, models: HydraModels,
          progress: bool = True) -> dict:
    """The train stage on `users`; returns per-module training metrics."""
    retriever, report = Retriever(task), {}
    for which, model in (("reranker", models.reranker), ("adapter", models.adapter)):
        examples = make_labels(task, llm, retriever, users, cfg, models.reranker, which,
                               cfg.include_train_queries, progress)
        report[which] = training.train_stage(model, examples, **_optim_args(cfg, progress))
        report[which]["positives"] = sum(e.label for e in examples)
        model.clear_cache()  # the frozen-feature cache pays off across epochs only; free it for what follows
        release_memory()
    return report


def fit(task: Task, llm: LLM, users: list[User], cfg: HydraConfig, models: HydraModels,
        progress: bool = True) -> dict:
    """The fit stage: fresh heads for `users` trained on their history only; the bases stay frozen."""
    retriever, report = Retriever(task), {}
    for which, model in (("reranker", models.reranker), ("adapter", models.adapter)):
        examples = make_labels(task, llm, retriever, users, cfg, models.reranker, which, False, progress)
        report[which] = training.fit_stage(model, examples, **_optim_args(cfg, progress))
        report[which]["positives"] = sum(e.label for e in examples)
        model.clear_cache()
        release_memory()
    return report


# ---------------------------------------------------------------- what federation moves
MODULES = ("reranker", "adapter")


def shared_arrays(models: HydraModels, modules: tuple[str, ...] = MODULES) -> dict[str, torch.Tensor]:
    """The shared part of `modules`, keyed "<module>/base/<param>" and "<module>/default-head/<param>":
    the trainable base layers, and the default head, which like the base is trained on every
    training user and serves users without a head of their own. No user's head is ever included."""
    out = {}
    for name in modules:
        model = getattr(models, name)
        out |= {f"{name}/base/{k}": v for k, v in model.shared_state().items()}
        out |= {f"{name}/default-head/{k}": v for k, v in model.default_head_state().items()}
    return out


def load_shared_arrays(models: HydraModels, arrays: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """Load what shared_arrays() made (any subset of modules); returns the modules it held.
    Any other key is an error: a payload must carry exactly these parameters."""
    by_module: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in arrays.items():
        parts = key.split("/", 2)
        if len(parts) != 3 or parts[0] not in MODULES or parts[1] not in ("base", "default-head"):
            raise ValueError(f"unexpected array {key!r} in a shared payload")
        module, part, param = parts
        by_module.setdefault(module, {}).setdefault(part, {})[param] = value
    for module, parts in by_module.items():
        model = getattr(models, module)
        model.load_shared_state(parts.get("base", {}))
        model.load_default_head_state(parts.get("default-head", {}))
    return tuple(m for m in MODULES if m in by_module)
