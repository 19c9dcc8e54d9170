"""What a federated client does with its private state, apart from Flower's messages.

- train_round: load the server's arrays of one module into the client's models (its users' heads stay
  as the client saved them), train that module (base + its users' heads + the default head) on labels
  made from the users' own history, save everything locally, return the module's shared arrays.
  With dp=record the training is DP-SGD (client/privacy.py); a client whose budget is spent returns the
  arrays it received unchanged, and its reply says so (dp-exhausted=1).
- install: keep a module's final shared arrays (the reranker, before the adapter rounds).
- calibration_sums: score the held-out training queries with the final adapter; additive sums per margin.
- fit_and_evaluate: for unseen users: load the final shared arrays, fit their heads (started from the
  default head) on their history with the base frozen, answer each user's query, return additive
  metric statistics.

Labels are cached in the state folder under a key of everything they depend on, and every LLM answer in
the client's own response cache, so a restarted client recomputes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from fedhydra.common import hydra, settings, training
from fedhydra.common import protocol as p
from fedhydra.common.config import HydraConfig
from fedhydra.common.llm import CachedLLM, ResponseCache, llm_from_settings
from fedhydra.common.llm.base import LLM
from fedhydra.common.metrics import metric_stats
from fedhydra.common.pipeline import HydraPipeline
from fedhydra.common.retrieval import Retriever

from .privacy import reply_metrics, train_record_dp
from .privacy_ledger import DPSettings, PrivacyLedger
from .state import ClientState

Say = Callable[[str], None]
_BACKENDS: dict[tuple, LLM] = {}
LABEL_FREE = tuple(k.replace("-", "_") for k in settings.tagged("label-free"))  # HydraConfig fields labels ignore


def client_llm(state: ClientState, values: dict) -> LLM:
    """The black-box LLM behind the client's own response cache. The cache-dir setting (simulations) is a
    second, read-through cache standing for the LLM provider's: identical prompts from the centralized
    baseline and other clients are answered once."""
    key = tuple(values.get(k) for k in ("llm", "llm-base-url", "llm-model", "llm-api-key-env", "llm-threads",
                                        "llm-concurrency", "llm-rpm", "llm-tpm"))
    if key not in _BACKENDS:  # one model per process: a simulation actor serves many clients in turn
        _BACKENDS[key] = llm_from_settings(values, cache=False)
    llm = _BACKENDS[key]
    if values.get("cache-dir"):
        llm = CachedLLM(llm, ResponseCache(values["cache-dir"]))
    return CachedLLM(llm, ResponseCache(state.llm_cache_dir))


def load_models(state: ClientState, cfg: HydraConfig, device: str | None = None) -> hydra.HydraModels:
    """The client's saved models, or fresh ones (seeded, so every client starts from the same default head)."""
    models = state.load_models(device=device)
    return hydra.HydraModels.new(cfg, device=device) if models is None else hydra.use_run_settings(models, cfg)


def _label_key(cfg: HydraConfig, module: str, role: str, llm: LLM, models: hydra.HydraModels) -> str:
    """Everything a module's labels depend on; adapter labels also depend on the reranker (its top-k)."""
    what = {"module": module, "role": role, "llm": llm.name,
            "config": {k: v for k, v in cfg.as_dict().items() if k not in LABEL_FREE}}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
    if module == p.ADAPTER:
        for name, tensor in sorted(models.reranker.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def module_examples(state: ClientState, module: str, role: str, llm: LLM, cfg: HydraConfig,
                    models: hydra.HydraModels, say: Say | None = None) -> list:
    """The labelled examples of `module` for the client's users of `role`, from the cache when valid."""
    key = _label_key(cfg, module, role, llm, models)
    cached = state.labels(module, key)
    if cached is not None:
        return cached
    real_queries = role == "train" and cfg.include_train_queries  # a test user's query is never a label
    examples = hydra.make_labels(state.task, llm, Retriever(state.task), state.users(role), cfg, models.reranker,
                                 module, real_queries, say)
    state.save_labels(module, key, examples)
    return examples


def _usage(llm: LLM, before, t0: float) -> dict:
    used = llm.stats.minus(before)
    return {p.LLM_CALLS: used.calls, p.TOKENS: used.tokens, p.CACHE_HITS: used.cache_hits,
            p.SECONDS: time.perf_counter() - t0}


def train_round(state: ClientState, llm: LLM, cfg: HydraConfig, module: str, shared: dict, server_round: int,
                reranker_digest: str = "", proximal_mu: float = 0.0, device: str | None = None,
                say: Say | None = None, privacy: DPSettings | None = None,
                lr_span: tuple[float, float] = (1.0, 0.0)) -> tuple[dict, dict]:
    """One local training of `module`; returns (its shared arrays, metrics). `privacy` with mode "record":
    DP-SGD, and the metrics carry the privacy statement (privacy.reply_metrics). `lr_span`: the round's part
    of the learning-rate decay (training.round_lr_span)."""
    if module not in p.MODULES:
        raise ValueError(f"unknown module {module!r}; modules: {p.MODULES}")
    t0, before = time.perf_counter(), llm.stats.copy()
    models = load_models(state, cfg, device)
    if module == p.ADAPTER and reranker_digest:
        held = hydra.digest({k: v.numpy() for k, v in hydra.shared_arrays(models, (p.RERANKER,)).items()})
        if held != reranker_digest:
            raise RuntimeError(f"client {state.folder} does not hold the final reranker the adapter rounds assume "
                               "(it missed the install message); it sits this round out")
    if hydra.load_shared_arrays(models, shared) != (module,):
        raise ValueError(f"a {module} round must carry exactly the {module}'s shared arrays")
    examples = module_examples(state, module, "train", llm, cfg, models, say)
    if not [e for e in examples if not getattr(e, "held_out", False)]:
        raise ValueError(f"client {state.folder} made no {module} examples (users without history?)")
    model = getattr(models, module)
    seed, dp_metrics = cfg.seed * 1000 + server_round, {}
    if privacy is not None and privacy.mode == "record":
        report = train_record_dp(model, examples, PrivacyLedger.load(state.privacy_ledger_path), privacy,
                                 module=module, server_round=server_round, seed=seed, proximal_mu=proximal_mu,
                                 say=say, lr_span=lr_span, **hydra.optim_args(cfg))
        dp_metrics = reply_metrics(report)
        if report["exhausted"]:  # nothing trained or saved; weight 1 so the round's mean moves as little as possible
            if say:
                say(f"record-level DP budget spent (epsilon {report['epsilon']:.3f} of {privacy.cap:g}): "
                    f"{module} round {server_round} not trained, arrays returned unchanged")
            return dict(shared), {p.NUM_EXAMPLES: 1, p.USERS: report["users"], p.LOSS: 0.0, p.ACCURACY: 0.0,
                                  **_usage(llm, before, t0), **dp_metrics}
    else:
        report = training.train_stage(model, examples, seed=seed, proximal_mu=proximal_mu, say=say,
                                      lr_span=lr_span, **hydra.optim_args(cfg))
    model.clear_cache()
    state.save_models(models)
    state.save_config(cfg)
    metrics = {p.NUM_EXAMPLES: report["examples"], p.USERS: report["users"], p.LOSS: report["loss"],
               p.ACCURACY: report["accuracy"], **_usage(llm, before, t0), **dp_metrics}
    arrays = {k: v.numpy() for k, v in hydra.shared_arrays(models, (module,)).items()}
    return {k: arrays[k] for k in shared}, metrics  # the order the message came in (mods match arrays by position)


def install(state: ClientState, cfg: HydraConfig, shared: dict, device: str | None = None) -> None:
    models = load_models(state, cfg, device)
    hydra.load_shared_arrays(models, shared)
    state.save_models(models)


def calibration_sums(state: ClientState, llm: LLM, cfg: HydraConfig, adapter: dict, say: Say | None = None,
                     device: str | None = None) -> dict[str, float]:
    """Additive sums per margin over the held-out training queries, with the final adapter and the users' heads
    (not noised: outside the record-level DP guarantee)."""
    models = load_models(state, cfg, device)
    hydra.load_shared_arrays(models, adapter)
    examples = module_examples(state, p.ADAPTER, "train", llm, cfg, models, say)
    sums = hydra.calibration_sums(state.task, models.adapter, examples, cfg)
    if say:
        say(f"calibration: {int(sums.get('queries', 0))} held-out queries scored")
    return sums


def fit_and_evaluate(state: ClientState, llm: LLM, cfg: HydraConfig, shared: dict, margin: float | None,
                     device: str | None = None, say: Say | None = None) -> tuple[dict[str, float], dict]:
    """Fit the unseen users' heads on their history (base frozen) and answer their queries with `margin`
    (None: greedy). Returns (additive metric statistics over the users (metrics.metric_stats), the users
    and costs); the answers themselves stay in the state folder (ClientState.answers).
    Outside every DP guarantee (dp=record covers only train rounds, client/privacy.py): the fit, the answers
    and these statistics are computed without noise."""
    t0, before = time.perf_counter(), llm.stats.copy()
    models = load_models(state, cfg, device)
    hydra.load_shared_arrays(models, shared)
    users = state.users("test")
    missing = [u.id for u in users if u.gold is None]
    if missing:
        raise ValueError(f"client {state.folder}: users {missing[:3]} have no gold answer to evaluate against")
    for module in cfg.fit_modules:  # reranker first: the adapter's labels use the fitted reranker's top-k
        model = getattr(models, module)
        examples = module_examples(state, module, "test", llm, cfg, models, say)
        hydra.fit_heads(model, examples, [u.id for u in users], cfg, module, say)
        model.clear_cache()
    state.save_models(models)
    state.save_config(replace(cfg, adapter_margin="off" if margin is None else repr(margin)))  # the service uses it
    pipe = HydraPipeline(state.task, llm, Retriever(state.task), models.reranker, models.adapter, cfg, margin)
    predictions = [a.text for a in pipe.answer_many(users, p.FULL)]
    stats = metric_stats(state.task, predictions, [u.gold for u in users])
    state.save_answers([{"id": u.id, "prediction": a, "gold": u.gold} for u, a in zip(users, predictions)])
    if say:
        say(f"answered {len(users)} unseen users")
    return stats, {p.USERS: len(users), **_usage(llm, before, t0)}


def set_threads(threads: int) -> None:
    """Torch threads for this process; a simulation runs one client per core."""
    threads = max(1, threads)
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
