"""HYDRA's two training stages for a HydraScorer (HYDRA.md §2 "How heads are trained", §3).

Train stage: the trainable base layers, the heads of the examples' users and the shared
default head learn together (loss = CE(user head) + CE(default head), so the default head
learns from every training user). Fit stage (unseen users): the base is frozen, so the
first-token features are computed once and only the users' heads train on them.

Both use HYDRA's optimisation (the HF Trainer defaults it ran with): AdamW (betas 0.9/0.999,
eps 1e-8), linear decay to 0 without warmup, weight decay on all but biases and LayerNorm
weights, gradient-norm clipping at 1.0, 2-class cross-entropy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .scorer import DEFAULT_HEAD, HydraScorer


@dataclass
class ScoredExample:
    """One labelled (query, text) pair of a user: label 1 = positive (useful item / good answer)."""

    user_id: str
    query: str
    text: str
    label: int

    def __post_init__(self):
        if not isinstance(self.user_id, str) or not self.user_id:
            raise ValueError(f"ScoredExample.user_id must be a non-empty string, got {self.user_id!r}")
        if not isinstance(self.query, str) or not isinstance(self.text, str):
            raise TypeError(f"ScoredExample of user {self.user_id!r}: query and text must be strings")
        if self.label not in (0, 1) or isinstance(self.label, float):
            raise ValueError(f"ScoredExample of user {self.user_id!r}: label must be 0 or 1, got {self.label!r}")
        self.label = int(self.label)


def _check_args(examples: list[ScoredExample], epochs: int, batch_size: int, lrs: list[float | None]) -> None:
    if not examples:
        raise ValueError("no training examples")
    bad = next((e for e in examples if not isinstance(e, ScoredExample)), None)
    if bad is not None:
        raise TypeError(f"examples must be ScoredExample, got {type(bad).__name__}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs ({epochs}) and batch_size ({batch_size}) must be at least 1")
    if any(lr is not None and not lr > 0 for lr in lrs):
        raise ValueError(f"learning rates must be positive, got {lrs}")


def _users_in_order(examples: list[ScoredExample]) -> list[str]:
    return list(dict.fromkeys(e.user_id for e in examples))


def _param_groups(modules: list[nn.Module], lr: float, weight_decay: float) -> list[dict]:
    """HF Trainer's split: no weight decay on biases and normalisation weights."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                is_norm = isinstance(sub, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(sub).__name__.lower()
                (no_decay if name == "bias" or is_norm else decay).append(p)
    return [g for g in ({"params": decay, "lr": lr, "weight_decay": weight_decay},
                        {"params": no_decay, "lr": lr, "weight_decay": 0.0}) if g["params"]]


def _optimizer(groups: list[dict], total_steps: int):
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / total_steps))
    return opt, sched


def _rng_devices(model: HydraScorer) -> list:
    return [model.device] if model.device.type == "cuda" else []


def train_stage(model: HydraScorer, examples: list[ScoredExample], epochs: int = 2, lr: float = 2e-5,
                head_lr: float | None = None, batch_size: int = 64, weight_decay: float = 0.01, seed: int = 0,
                progress: bool = True, max_grad_norm: float = 1.0) -> dict:
    """Train the trainable base layers + the examples' users' heads + the default head together.

    Users without a head get a fresh one (deterministic for the seed). `head_lr` (default: `lr`,
    as HYDRA) is the heads' learning rate. Returns {loss, user_loss, default_loss, accuracy,
    examples, users, steps, epochs, seconds}; losses are means over all steps, accuracy is the
    user heads' on the last epoch.
    """
    _check_args(examples, epochs, batch_size, [lr, head_lr])
    start = time.perf_counter()
    users = _users_in_order(examples)
    was_training = model.training
    with torch.random.fork_rng(devices=_rng_devices(model)):
        torch.manual_seed(seed)  # head init and dropout are reproducible, the caller's RNG is untouched
        for uid in users:
            if not model.has_user(uid):
                model.add_user(uid)
        heads = [model.head(uid) for uid in users] + [model.heads[DEFAULT_HEAD]]
        groups = _param_groups(model.top_layers, lr, weight_decay) + _param_groups(heads, head_lr or lr, weight_decay)
        params = [p for g in groups for p in g["params"]]
        per_epoch = math.ceil(len(examples) / batch_size)
        opt, sched = _optimizer(groups, per_epoch * epochs)
        order = torch.Generator().manual_seed(seed)
        ce = nn.CrossEntropyLoss()
        sums = {"loss": 0.0, "user_loss": 0.0, "default_loss": 0.0}
        steps = correct = 0
        model.train()
        try:
            with tqdm(total=per_epoch * epochs, desc="train stage", disable=not progress, unit="step") as bar:
                for epoch in range(epochs):
                    perm = torch.randperm(len(examples), generator=order).tolist()
                    for b in range(per_epoch):
                        batch = [examples[i] for i in perm[b * batch_size:(b + 1) * batch_size]]
                        labels = torch.tensor([e.label for e in batch], device=model.device)
                        feats = model.encode([e.query for e in batch], [e.text for e in batch])
                        user_logits = model.head_logits(feats, [e.user_id for e in batch])
                        user_loss = ce(user_logits, labels)
                        default_loss = ce(model.heads[DEFAULT_HEAD](feats), labels)
                        loss = user_loss + default_loss
                        _step(loss, params, opt, sched, max_grad_norm)
                        steps += 1
                        for k, v in (("loss", loss), ("user_loss", user_loss), ("default_loss", default_loss)):
                            sums[k] += v.detach().item()
                        if epoch == epochs - 1:
                            correct += int((user_logits.argmax(-1) == labels).sum())
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss.detach().item():.3f}")
        finally:
            model.train(was_training)
    return {**{k: v / steps for k, v in sums.items()}, "accuracy": correct / len(examples),
            "examples": len(examples), "users": len(users), "steps": steps, "epochs": epochs,
            "seconds": time.perf_counter() - start}


@torch.no_grad()
def _features(model: HydraScorer, examples: list[ScoredExample], batch_size: int, progress: bool) -> torch.Tensor:
    """First-token features of every example, each distinct (query, text) encoded once, in eval mode."""
    pairs = list(dict.fromkeys((e.query, e.text) for e in examples))
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for s in tqdm(range(0, len(pairs), batch_size), desc="fit stage: encode", disable=not progress, unit="batch"):
            chunk = pairs[s:s + batch_size]
            chunks.append(model.encode([q for q, _ in chunk], [t for _, t in chunk]))
    finally:
        model.train(was_training)
    feats = torch.cat(chunks)
    row = {p: i for i, p in enumerate(pairs)}
    return feats[torch.tensor([row[(e.query, e.text)] for e in examples], device=feats.device)]


def fit_stage(model: HydraScorer, examples: list[ScoredExample], epochs: int = 2, lr: float = 2e-5,
              head_lr: float | None = None, batch_size: int = 64, weight_decay: float = 0.01, seed: int = 0,
              progress: bool = True, reset_heads: bool = False, max_grad_norm: float = 1.0) -> dict:
    """Fit the examples' users' heads on a frozen base (HYDRA's fit stage for unseen users).

    Only heads train, at `head_lr` (default: `lr`, as HYDRA); the signature mirrors train_stage.
    Users without a head get a fresh one; `reset_heads=True` re-initialises existing heads too
    (HYDRA's behaviour). Only those heads change: the base is checked bit-identical afterwards
    (RuntimeError otherwise) and the default head is not trained. Returns {loss, accuracy,
    examples, users, steps, epochs, seconds}.
    """
    _check_args(examples, epochs, batch_size, [lr, head_lr])
    start = time.perf_counter()
    users = _users_in_order(examples)
    before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    with torch.random.fork_rng(devices=_rng_devices(model)):
        torch.manual_seed(seed)
        for uid in users:
            if reset_heads or not model.has_user(uid):
                model.add_user(uid, replace=True)
        heads = [model.head(uid) for uid in users]
        feats = _features(model, examples, batch_size, progress)
        labels_all = torch.tensor([e.label for e in examples], device=feats.device)
        uids_all = [e.user_id for e in examples]
        groups = _param_groups(heads, head_lr or lr, weight_decay)
        params = [p for g in groups for p in g["params"]]
        per_epoch = math.ceil(len(examples) / batch_size)
        opt, sched = _optimizer(groups, per_epoch * epochs)
        order = torch.Generator().manual_seed(seed)
        ce = nn.CrossEntropyLoss()
        total = 0.0
        steps = correct = 0
        modes = [h.training for h in heads]
        for h in heads:
            h.train()
        try:
            with tqdm(total=per_epoch * epochs, desc="fit stage", disable=not progress, unit="step") as bar:
                for epoch in range(epochs):
                    perm = torch.randperm(len(examples), generator=order)
                    for b in range(per_epoch):
                        idx = perm[b * batch_size:(b + 1) * batch_size]
                        labels = labels_all[idx.to(labels_all.device)]
                        logits = model.head_logits(feats[idx.to(feats.device)], [uids_all[i] for i in idx.tolist()])
                        loss = ce(logits, labels)
                        _step(loss, params, opt, sched, max_grad_norm)
                        steps += 1
                        total += loss.detach().item()
                        if epoch == epochs - 1:
                            correct += int((logits.argmax(-1) == labels).sum())
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss.detach().item():.3f}")
        finally:
            for h, m in zip(heads, modes):
                h.train(m)
    changed = [n for n, p in model.encoder.named_parameters() if not torch.equal(p, before[n])]
    if changed:
        raise RuntimeError(f"fit stage changed base parameters {changed[:3]}; the base must stay frozen")
    return {"loss": total / steps, "accuracy": correct / len(examples), "examples": len(examples),
            "users": len(users), "steps": steps, "epochs": epochs, "seconds": time.perf_counter() - start}


def _step(loss: torch.Tensor, params: list, opt: torch.optim.Optimizer, sched, max_grad_norm: float | None) -> None:
    """One optimiser step: backward, optional clipping (the HF Trainer's default of 1.0), update, schedule."""
    loss.backward()
    if max_grad_norm:
        nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
