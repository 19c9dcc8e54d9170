"""HYDRA's two training stages for a HydraScorer (HYDRA.md §2 "How heads are trained", §3).

Train stage: the trainable base layers, the heads of the examples' users and the shared default head
learn together (loss = loss(user head) + loss(default head), so the default head learns from every
training user). Fit stage (unseen users): the base is frozen, so the first-token features are
computed once and only the users' heads train on them; a new head starts as a copy of the default
head (FedHydra) or at random (HYDRA).

The training data (pointwise `ScoredExample`s, listwise `CandidateGroup`s) and the loss over a batch of
them live in examples.py.

Optimisation is HYDRA's (the HF Trainer defaults it ran with): AdamW (betas 0.9/0.999, eps 1e-8),
linear decay to 0 without warmup, weight decay on all but biases and LayerNorm weights,
gradient-norm clipping at 1.0. `proximal_mu` adds FedProx's proximal term on the shared layers.

One loop (`_optimise`) runs every stage: seeding, heads, parameter groups, AdamW and its schedule, the
epochs and the report are written once. A stage differs only in its step (`_train_step`, `_fit_step`) and,
for record-level DP, in its batches and step, which client/privacy.py's RecordDPSGD supplies as
train_stage's `private` option (PrivateSteps).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .examples import CandidateGroup, Example, ScoredExample, batch_loss, batches, rows_of
from .scorer import DEFAULT_HEAD, HydraScorer


Say = Callable[[str], None]
PROGRESS_EVERY_S = 60.0  # a stage longer than this says how far it is, about this often


def check_args(examples: list, epochs: int, batch_size: int, lrs: list[float | None]) -> None:
    if not examples:
        raise ValueError("no training examples")
    kinds = {type(e) for e in examples}
    if not kinds <= {ScoredExample, CandidateGroup} or len(kinds) > 1:
        raise TypeError(f"examples must all be ScoredExample or all CandidateGroup, got {sorted(k.__name__ for k in kinds)}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs ({epochs}) and batch_size ({batch_size}) must be at least 1")
    if any(lr is not None and not lr > 0 for lr in lrs):
        raise ValueError(f"learning rates must be positive, got {lrs}")


def param_groups(modules: list[nn.Module], lr: float, weight_decay: float) -> list[dict]:
    """HF Trainer's split: no weight decay on biases and normalisation weights. A submodule with a `fixed_lr`
    (the scorer's candidate-feature weights, scorer.py) trains at that learning rate without weight decay."""
    decay, no_decay, fixed, seen = [], [], {}, set()
    for module in modules:
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                if hasattr(sub, "fixed_lr"):
                    fixed.setdefault(float(sub.fixed_lr), []).append(p)
                    continue
                is_norm = isinstance(sub, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(sub).__name__.lower()
                (no_decay if name == "bias" or is_norm else decay).append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    groups += [{"params": ps, "lr": own, "weight_decay": 0.0} for own, ps in fixed.items()]
    return [g for g in groups if g["params"]]


def adamw_linear_decay(groups: list[dict], total_steps: int, lr_span: tuple[float, float] = (1.0, 0.0)):
    """HYDRA's optimiser (AdamW, betas 0.9/0.999, eps 1e-8) and its schedule: the learning rate falls linearly
    over total_steps from lr_span[0] to lr_span[1] times each group's lr (HYDRA: from 1 to 0)."""
    first, last = lr_span
    if not 1.0 >= first >= last >= 0.0:
        raise ValueError(f"lr_span must fall within [0, 1], got {lr_span}")
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(last, first - (first - last) * step / total_steps))
    return opt, sched


def round_lr_span(schedule: str, module_round: int, rounds: int) -> tuple[float, float]:
    """The part of the linear decay one federated round of a module runs (see adamw_linear_decay).

    "run": the rounds share one decay, round r of R from 1 - (r-1)/R to 1 - r/R, so the federated run follows
    the centralized schedule over rounds x epochs and the last round's updates are small (a fresh full-rate
    AdamW each round moves every parameter by about lr on its first step, and the server averages those
    kicks). "round" (the default until a LaMP-7 rerun backs a change): each round decays from 1 to 0 on its own."""
    if not 1 <= module_round <= rounds:
        raise ValueError(f"round {module_round} is outside 1..{rounds}")
    if schedule == "round":
        return 1.0, 0.0
    if schedule == "run":
        return 1.0 - (module_round - 1) / rounds, 1.0 - module_round / rounds
    raise ValueError(f"unknown lr schedule {schedule!r}; choose run or round")


def _rng_devices(model: HydraScorer) -> list:
    return [model.device] if model.device.type == "cuda" else []


class PrivateSteps(Protocol):
    """Differentially private SGD as an option of train_stage (client/privacy.py's RecordDPSGD: DP-SGD over
    privacy units with Opacus). It decides what a batch is and how one optimiser step is taken; everything
    else (seeding, heads, parameter groups, optimiser, schedule, the loop and its report) is train_stage's."""

    def plan(self, examples: list[Example], epochs: int) -> list[list]:
        """Every step's batch, per epoch."""

    def steps(self, model: HydraScorer, params: list[nn.Parameter], opt: torch.optim.Optimizer, sched,
              anchor: list[torch.Tensor], proximal_mu: float) -> AbstractContextManager[Callable[[list], Step]]:
        """A context in which the returned function takes one private step on a batch."""


@dataclass
class Step:
    """What one optimiser step reports: its loss terms ("loss" is the one optimised), the items (examples or
    privacy units) it saw and got right, and `weight`: what the report averages "loss" over (1 per step for a
    batch mean; the units of a batch for DP's sum over units)."""

    losses: dict[str, float]
    correct: int
    items: int
    weight: float = 1.0


def train_stage(model: HydraScorer, examples: list[Example], epochs: int = 2, lr: float = 2e-5,
                head_lr: float | None = None, batch_size: int = 64, weight_decay: float = 0.01, seed: int = 0,
                progress: bool = True, max_grad_norm: float = 1.0, proximal_mu: float = 0.0,
                say: Say | None = None, private: PrivateSteps | None = None,
                lr_span: tuple[float, float] = (1.0, 0.0)) -> dict:
    """Train the trainable base layers + the examples' users' heads + the default head together.

    Users without a head get a copy of the default head. `head_lr` (default: `lr`, as HYDRA) is the
    heads' learning rate; `proximal_mu` > 0 adds FedProx's mu/2 ||w - w_start||^2 on the base layers.
    `private`: DP-SGD instead of plain steps (its batches and steps; see PrivateSteps). `lr_span`: the part of
    the linear decay these epochs run (a federated round's: round_lr_span).
    `say` gets a line per epoch. Returns {loss, user_loss, default_loss, accuracy, examples, users,
    steps, epochs, items, seconds}; losses are means over all steps (DP: over the sampled units), accuracy is
    the user heads' on the last epoch; items counts what the steps saw (DP: the sampled units).
    """
    return _optimise(model, examples, base=True, init="new", epochs=epochs, lr=lr, head_lr=head_lr,
                     batch_size=batch_size, weight_decay=weight_decay, seed=seed, max_grad_norm=max_grad_norm,
                     proximal_mu=proximal_mu, say=say, progress=progress, private=private, lr_span=lr_span)


def fit_stage(model: HydraScorer, examples: list[Example], epochs: int = 2, lr: float = 2e-5,
              head_lr: float | None = None, batch_size: int = 64, weight_decay: float = 0.01, seed: int = 0,
              progress: bool = True, init: str = "default", max_grad_norm: float = 1.0,
              say: Say | None = None) -> dict:
    """Fit the examples' users' heads on a frozen base (HYDRA's fit stage for unseen users).

    Only heads train, at `head_lr` (default: `lr`, as HYDRA). `init`: "default" starts every user's head
    as a copy of the trained default head (FedHydra: a user with little history stays near it), "random"
    re-initialises it (HYDRA), "keep" continues from the head it has. The base is checked bit-identical
    afterwards (RuntimeError otherwise) and the default head is not trained. Returns {loss, accuracy,
    examples, users, steps, epochs, items, seconds}.
    """
    if init not in ("default", "random", "keep"):
        raise ValueError(f"init must be default, random or keep, got {init!r}")
    before = {n: p.detach().clone() for n, p in base_parameters(model).items()}
    report = _optimise(model, examples, base=False, init=init, epochs=epochs, lr=lr, head_lr=head_lr,
                       batch_size=batch_size, weight_decay=weight_decay, seed=seed, max_grad_norm=max_grad_norm,
                       say=say, progress=False)
    changed = [n for n, p in base_parameters(model).items() if not torch.equal(p, before[n])]
    if changed:
        raise RuntimeError(f"fit stage changed base parameters {changed[:3]}; the base must stay frozen")
    return report


def _optimise(model: HydraScorer, examples: list[Example], *, base: bool, init: str, epochs: int, lr: float,
              head_lr: float | None, batch_size: int, weight_decay: float, seed: int, max_grad_norm: float,
              say: Say | None, progress: bool, proximal_mu: float = 0.0,
              private: PrivateSteps | None = None, lr_span: tuple[float, float] = (1.0, 0.0)) -> dict:
    """The one training loop of every stage. `base`: the train stage (trainable base layers, user heads and
    the default head, loss of both heads); else the fit stage (user heads only, on features computed once).
    `init`: how a user's head starts: "new" (the train stage) and "keep" leave an existing head as it is and
    start a missing one from the default head; "default" and "random" (re)start every head (see fit_stage)."""
    examples = [e for e in examples if not getattr(e, "held_out", False)]
    check_args(examples, epochs, batch_size, [lr, head_lr])
    if private is not None and not base:
        raise ValueError("DP-SGD trains the train stage only")
    start = time.perf_counter()
    users = list(dict.fromkeys(e.user_id for e in examples))
    was_training = model.training
    with torch.random.fork_rng(devices=_rng_devices(model)):
        torch.manual_seed(seed)  # dropout and order are reproducible; the caller's RNG is untouched
        for uid in users:
            if init in ("new", "keep") and model.has_user(uid):
                continue  # the head trains on from where it is
            model.add_user(uid, replace=init != "new", from_default=init != "random")
        heads = [model.head(uid) for uid in users] + ([model.heads[DEFAULT_HEAD]] if base else [])
        groups = ((param_groups(model.shared_modules(), lr, weight_decay) if base else [])
                  + param_groups(heads, head_lr or lr, weight_decay))
        params = [p for g in groups for p in g["params"]]
        anchor = [p.detach().clone() for p in model.trainable_base_parameters()] if base and proximal_mu else []
        if private is not None:
            plan = private.plan(examples, epochs)
        else:
            order_rng = torch.Generator().manual_seed(seed)
            plan = [batches(examples, torch.randperm(len(examples), generator=order_rng).tolist(), batch_size)
                    for _ in range(epochs)]
        total = sum(len(p) for p in plan)
        opt, sched = adamw_linear_decay(groups, total, lr_span)
        if private is not None:
            stepping = private.steps(model, params, opt, sched, anchor, proximal_mu)
        elif base:
            stepping = nullcontext(lambda batch: _train_step(model, batch, params, opt, sched, max_grad_norm,
                                                             anchor, proximal_mu))
        else:
            feats, index = _features(model, examples, batch_size), {id(e): i for i, e in enumerate(examples)}
            stepping = nullcontext(lambda batch: _fit_step(model, batch, [feats[index[id(e)]] for e in batch],
                                                           params, opt, sched, max_grad_norm))
        modes = [h.training for h in heads]
        for module in [model] if base else heads:
            module.train()  # the fit stage's base keeps its mode (its features are already computed)
        sums, weight, steps, correct, seen, items = {}, 0.0, 0, 0, 0, 0
        told = time.perf_counter()
        try:
            with stepping as step:
                for epoch, epoch_batches in enumerate(plan):
                    for i, batch in enumerate(epoch_batches):
                        done = step(batch)
                        now = time.perf_counter()
                        if say and now - told > PROGRESS_EVERY_S:  # a long stage says how far it is
                            told, left = now, (now - start) / (steps + 1) * (total - steps - 1)
                            say(f"{'' if base else 'fit '}epoch {epoch + 1}/{epochs}: step {i + 1}/{len(epoch_batches)}"
                                f", about {int(left // 60)} min {int(left % 60)} s left")
                        steps, weight, items = steps + 1, weight + done.weight, items + done.items
                        for k, v in done.losses.items():
                            sums[k] = sums.get(k, 0.0) + v
                        if epoch == epochs - 1:
                            correct, seen = correct + done.correct, seen + done.items
                    mean = sums.get("loss", 0.0) / max(weight, 1)
                    if say:
                        say(f"{'' if base else 'fit '}epoch {epoch + 1}/{epochs}: mean loss {mean:.4f}")
                    elif progress:
                        print(f"train stage: epoch {epoch + 1}/{epochs}, mean loss {mean:.4f}", flush=True)
        finally:
            if base:
                model.train(was_training)
            else:
                for h, m in zip(heads, modes):
                    h.train(m)
    return {**{k: v / max(weight, 1) for k, v in sums.items()}, "accuracy": correct / max(seen, 1),
            "examples": len(examples), "users": len(users), "steps": steps, "epochs": epochs, "items": items,
            "seconds": time.perf_counter() - start}


def _train_step(model: HydraScorer, batch: list[Example], params: list, opt, sched, max_grad_norm: float,
                anchor: list[torch.Tensor], proximal_mu: float) -> Step:
    """The train stage's step: the user heads' loss plus the default head's (+ FedProx's proximal term)."""
    uids, queries, texts, extra = rows_of(batch)
    feats = model.encode(queries, texts)
    term = model.feature_logits(model.extra_tensor(extra), len(texts))
    user_loss, right = batch_loss(batch, model.head_logits(feats, uids) + term, model.listwise_loss)
    default_loss, _ = batch_loss(batch, model.heads[DEFAULT_HEAD](feats) + term, model.listwise_loss)
    loss = user_loss + default_loss
    if proximal_mu:
        loss = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in
                                             zip(model.trainable_base_parameters(), anchor))
    _step(loss, params, opt, sched, max_grad_norm)
    return Step({"loss": loss.detach().item(), "user_loss": user_loss.detach().item(),
                 "default_loss": default_loss.detach().item()}, right, len(batch))


def _fit_step(model: HydraScorer, batch: list[Example], feats: list[torch.Tensor], params: list, opt, sched,
              max_grad_norm: float) -> Step:
    """The fit stage's step: the user heads' loss on the batch's precomputed features."""
    uids, _, texts, extra = rows_of(batch)
    with torch.no_grad():  # the shared feature weights are part of the frozen base here
        term = model.feature_logits(model.extra_tensor(extra), len(texts))
    loss, right = batch_loss(batch, model.head_logits(torch.cat(feats), uids) + term, model.listwise_loss)
    _step(loss, params, opt, sched, max_grad_norm)
    return Step({"loss": loss.detach().item()}, right, len(batch))


@torch.no_grad()
def _features(model: HydraScorer, examples: list[Example], batch_size: int) -> list[torch.Tensor]:
    """First-token features of every example's rows (one [rows, H] tensor per example), each distinct
    (query, text) encoded once, in eval mode."""
    pairs: dict[tuple[str, str], int] = {}
    for e in examples:
        for t in ([e.text] if isinstance(e, ScoredExample) else e.texts):
            pairs.setdefault((e.query, t), len(pairs))
    keys = list(pairs)
    was_training = model.training
    model.eval()
    try:
        chunks = [model.encode([q for q, _ in keys[s:s + batch_size]], [t for _, t in keys[s:s + batch_size]])
                  for s in range(0, len(keys), batch_size)]
    finally:
        model.train(was_training)
    feats = torch.cat(chunks)
    out = []
    for e in examples:
        texts = [e.text] if isinstance(e, ScoredExample) else e.texts
        out.append(feats[torch.tensor([pairs[(e.query, t)] for t in texts], device=feats.device)])
    return out


def base_parameters(model: HydraScorer) -> dict[str, torch.Tensor]:
    """Every parameter of the base, frozen or shared (the fit stage must leave them all unchanged)."""
    return dict(model.encoder.named_parameters()) | model.shared_parameters()


def _step(loss: torch.Tensor, params: list, opt: torch.optim.Optimizer, sched, max_grad_norm: float | None) -> None:
    """One optimiser step: backward, optional clipping (the HF Trainer's default of 1.0), update, schedule."""
    loss.backward()
    if max_grad_norm:
        nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
