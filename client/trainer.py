"""What a federated client does with its private state, apart from Flower's messages.

- train_round: load the server's shared arrays into the client's models (its users' heads stay
  as the client saved them), train one module (base + its users' heads + the default head) on
  labels made from the users' own history, save everything locally, return the module's
  shared arrays and training metrics.
- fit_and_evaluate: for unseen users: load the final shared arrays, fit fresh heads on their
  history with the base frozen, answer each user's query, return additive metric statistics.

Labels are cached in the state folder under a key of everything they depend on, and every LLM
answer in the client's own response cache, so a restarted client recomputes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace

import torch

from fedhydra.common import hydra, training
from fedhydra.common.config import HydraConfig
from fedhydra.common.llm import CachedLLM, ResponseCache, make_llm
from fedhydra.common.llm.base import LLM
from fedhydra.common.metrics import metric_stats
from fedhydra.common.pipeline import HydraPipeline
from fedhydra.common.retrieval import Retriever

from .state import ClientState


_BACKENDS: dict[tuple, LLM] = {}


def client_llm(state: ClientState, backend: str = "embedded", base_url: str | None = None,
               model: str | None = None, shared_cache: str | None = None, threads: int = 1) -> LLM:
    """The black-box LLM behind the client's own response cache. `shared_cache` (simulation only)
    is a second, read-through cache standing for the LLM provider's: identical prompts from the
    centralized baseline and other clients are answered once."""
    key = (backend, base_url, model, threads)
    if key not in _BACKENDS:  # one model per process: a simulation actor serves many clients in turn
        kw = {"n_threads": threads} if backend == "embedded" else {}
        _BACKENDS[key] = make_llm(backend, base_url=base_url, model=model, cache=False, **kw)
    llm = _BACKENDS[key]
    if shared_cache:
        llm = CachedLLM(llm, ResponseCache(shared_cache))
    return CachedLLM(llm, ResponseCache(state.llm_cache_dir))


def load_models(state: ClientState, cfg: HydraConfig, device: str | None = None) -> hydra.HydraModels:
    """The client's saved models, or fresh ones (seeded, so every client starts from the same default head)."""
    models = state.load_models(device=device)
    return models if models is not None else hydra.HydraModels.new(cfg, device=device)


def _label_key(cfg: HydraConfig, module: str, role: str, llm: LLM, models: hydra.HydraModels) -> str:
    """Everything a module's labels depend on; adapter labels also depend on the reranker (its top-k)."""
    what = {"module": module, "role": role, "llm": llm.name,
            "config": {k: v for k, v in cfg.as_dict().items()
                       if k not in ("epochs", "lr", "head_lr", "batch_size", "weight_decay")}}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
    if module == "adapter":
        reranker = models.reranker
        for name, tensor in sorted(reranker.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def module_examples(state: ClientState, module: str, role: str, llm: LLM, cfg: HydraConfig,
                    models: hydra.HydraModels, progress: bool = False) -> list[training.ScoredExample]:
    """The labelled examples of `module` for the client's users of `role`, from the cache when valid."""
    key = _label_key(cfg, module, role, llm, models)
    cached = state.labels(module, key)
    if cached is not None:
        return cached
    users = state.users(role)
    real_queries = role == "train" and cfg.include_train_queries  # a test user's query is never a label
    examples = hydra.make_labels(state.task, llm, Retriever(state.task), users, cfg, models.reranker,
                                 module, real_queries, progress)
    state.save_labels(module, key, examples)
    return examples


def train_round(state: ClientState, llm: LLM, cfg: HydraConfig, module: str, shared: dict[str, torch.Tensor],
                server_round: int, device: str | None = None, progress: bool = False):
    """One local training of `module`; returns (its shared arrays, metrics)."""
    if module not in hydra.MODULES:
        raise ValueError(f"unknown module {module!r}; modules: {hydra.MODULES}")
    t0, before = time.perf_counter(), llm.stats.copy()
    models = load_models(state, cfg, device)
    hydra.load_shared_arrays(models, shared)
    examples = module_examples(state, module, "train", llm, cfg, models, progress)
    if not examples:
        raise ValueError(f"client {state.folder} made no {module} examples (users without history?)")
    model = getattr(models, module)
    report = training.train_stage(model, examples, epochs=cfg.epochs, lr=cfg.lr, head_lr=cfg.head_lr,
                                  batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                                  seed=cfg.seed * 1000 + server_round, progress=progress)
    model.clear_cache()
    state.save_models(models)
    state.save_config(cfg)
    used = llm.stats.minus(before)
    metrics = {"num-examples": len(examples), "users": report["users"], "loss": report["loss"],
               "accuracy": report["accuracy"], "positives": sum(e.label for e in examples),
               "llm-calls": used.calls, "tokens": used.tokens, "cache-hits": used.cache_hits,
               "seconds": time.perf_counter() - t0}
    return hydra.shared_arrays(models, (module,)), metrics


def fit_and_evaluate(state: ClientState, llm: LLM, cfg: HydraConfig, shared: dict[str, torch.Tensor],
                     device: str | None = None, progress: bool = False) -> dict[str, float]:
    """Fit the unseen users' heads on their history (base frozen) and answer their queries.
    Returns additive metric statistics over the users (metrics.metric_stats) plus costs."""
    t0, before = time.perf_counter(), llm.stats.copy()
    models = load_models(state, cfg, device)
    hydra.load_shared_arrays(models, shared)
    users = state.users("test")
    missing = [u.id for u in users if u.gold is None]
    if missing:
        raise ValueError(f"client {state.folder}: users {missing[:3]} have no gold answer to evaluate against")
    fit_cfg = replace(cfg, include_train_queries=False)
    for module in hydra.MODULES:  # reranker first: the adapter's labels use the fitted reranker's top-k
        model = getattr(models, module)
        examples = module_examples(state, module, "test", llm, fit_cfg, models, progress)
        training.fit_stage(model, examples, epochs=cfg.epochs, lr=cfg.lr, head_lr=cfg.head_lr,
                           batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, seed=cfg.seed,
                           progress=progress, reset_heads=True)  # fresh heads: a re-evaluation repeats exactly
        model.clear_cache()
    state.save_models(models)
    state.save_config(cfg)
    pipe = HydraPipeline(state.task, llm, Retriever(state.task), models.reranker, models.adapter, cfg)
    predictions = [pipe.answer(u, "full").text for u in users]
    stats = metric_stats(state.task, predictions, [u.gold for u in users])
    used = llm.stats.minus(before)
    return {**{f"stat:{k}": v for k, v in stats.items()}, "users": len(users), "llm-calls": used.calls,
            "tokens": used.tokens, "cache-hits": used.cache_hits, "seconds": time.perf_counter() - t0}


def set_threads(threads: int) -> None:
    """Torch threads for this process; a simulation runs one client per core."""
    threads = max(1, threads)
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
