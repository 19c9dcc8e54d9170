"""Record-level differential privacy on the client (setting dp=record): DP-SGD with Opacus over everything
a train round changes, the shared top layers, the users' heads and the default head together (heads shape
later base gradients, so they train under the same guarantee).

Unit of privacy: one pseudo-query, i.e. every row that one query made: its M retrieved (query, item) pairs
for the reranker, its candidate group for the adapter (rows with the same user and query text form one
unit, so a label-set query of the same item joins it). Opacus computes per-row gradients (hooks on the
trainable Linear and LayerNorm layers); a unit's loss depends only on its own rows, so the unit's gradient is
the sum of its rows' per-row gradients. They are summed per unit (index_add) before Opacus's DPOptimizer
clips each unit to `dp-clip` and adds Gaussian noise; units (not rows) are Poisson-sampled. The neighbouring
relation is add-or-remove-one-unit; the accountant (client/privacy_ledger.py) keeps epsilon for a unit and
the group-privacy epsilon for a profile item, which enters several units (K of them).

Randomness: the unit sampling and the noise come from torch generators seeded from OS entropy (`secrets`),
never from the run seed, which FedHydra sets publicly so runs are reproducible. Dropout still follows the run
seed; the guarantee does not rely on it.

Not covered: the fit stage of unseen users (training.fit_stage on a test client, trainer.fit_and_evaluate)
and their answers; the adapter-margin calibration sums over held-out training queries; label generation as
preprocessing that looks across units (which items become pseudo-queries; which are retrieved, as BM25's
statistics span the whole profile; for generation tasks the reranker's positive threshold, the user's mean over
all rows); the metrics a reply carries besides the dp-* ones (loss, accuracy, counts); and the profile text a
remote LLM provider sees in prompts (only the embedded LLM keeps it on the device).
"""

from __future__ import annotations

import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .privacy_ledger import DPSettings, Plan, PrivacyLedger, RoundEntry  # first: it imports opacus quietly

from opacus.grad_sample import GradSampleHooks  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402
from torch import nn

from fedhydra.common import protocol as p
from fedhydra.common import training
from fedhydra.common.examples import CandidateGroup, Example, batch_loss, rows_of
from fedhydra.common.scorer import DEFAULT_HEAD, HydraScorer


Say = Callable[[str], None]


@dataclass
class Unit:
    """One privacy unit: the examples one pseudo-query made, and the profile items they carry
    (None when some example did not record its sources)."""

    user_id: str
    query: str
    examples: list[Example]
    sources: frozenset[str] | None

    @property
    def rows(self) -> int:
        return sum(len(e.texts) if isinstance(e, CandidateGroup) else 1 for e in self.examples)


def privacy_units(examples: list[Example]) -> list[Unit]:
    """The examples grouped by (user, query), in order of first appearance; held-out groups are left out."""
    units: dict[tuple[str, str], Unit] = {}
    for e in examples:
        if getattr(e, "held_out", False):
            continue
        unit = units.setdefault((e.user_id, e.query), Unit(e.user_id, e.query, [], frozenset()))
        unit.examples.append(e)
        if unit.sources is not None:
            unit.sources = (unit.sources | frozenset(e.sources)) if e.sources else None
    return list(units.values())


def item_units(units: list[Unit]) -> int:
    """K: the most units any one profile item enters. A user with a unit of unknown sources (labels cached
    before sources were recorded) counts all their units: any of them may hold any of their items."""
    most = 1
    by_user: dict[str, list[Unit]] = {}
    for u in units:
        by_user.setdefault(u.user_id, []).append(u)
    for user_units in by_user.values():
        if any(u.sources is None for u in user_units):
            most = max(most, len(user_units))
            continue
        counts: dict[str, int] = {}
        for u in user_units:
            for item in u.sources:
                counts[item] = counts.get(item, 0) + 1
        most = max(most, *counts.values(), 1)
    return most


def masked_head_logits(model: HydraScorer, features: torch.Tensor, user_ids: list[str]) -> torch.Tensor:
    """HydraScorer.head_logits with Opacus-friendly routing: every head of the batch runs on the whole batch
    and a one-hot mask keeps each row's own head (index_select routing gives per-sample gradients of unequal
    batch sizes, PRIVACY.md). A row of another user contributes exactly zero to a head's gradient."""
    logits = features.new_zeros(features.shape[0], 2)
    for uid in dict.fromkeys(user_ids):
        mask = torch.tensor([u == uid for u in user_ids], dtype=features.dtype, device=features.device)
        logits = logits + mask[:, None] * model.head(uid)(features)
    return logits


def units_loss(model: HydraScorer, units: list[Unit]) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(sum over units of each unit's loss, correct items, the unit index of every row). A unit's loss is
    batch_loss over its own rows, user head plus default head, as in train_stage."""
    batch = [e for u in units for e in u.examples]
    uids, queries, texts, extra = rows_of(batch)
    feats = model.encode(queries, texts)
    term = model.feature_logits(model.extra_tensor(extra), len(texts))
    user_logits = masked_head_logits(model, feats, uids) + term
    default_logits = model.heads[DEFAULT_HEAD](feats) + term
    total, correct, start, row_unit = feats.new_zeros(()), 0, 0, []
    for i, unit in enumerate(units):
        rows = slice(start, start + unit.rows)
        user_loss, right = batch_loss(unit.examples, user_logits[rows], model.listwise_loss)
        default_loss, _ = batch_loss(unit.examples, default_logits[rows], model.listwise_loss)
        total = total + user_loss + default_loss
        correct += right
        row_unit += [i] * unit.rows
        start += unit.rows
    return total, correct, torch.tensor(row_unit, device=feats.device)


def _per_unit(params: list[nn.Parameter], row_unit: torch.Tensor, n_units: int) -> list[torch.Tensor]:
    """Each parameter's per-row grad_sample summed per unit (zeros where no row reached it, e.g. the head of a
    user without a unit in the chunk); grad_sample is cleared, so the next backward pass starts afresh."""
    out = []
    for p in params:
        per_unit = p.new_zeros((n_units, *p.shape))
        rows = getattr(p, "grad_sample", None)
        if rows is not None:
            if isinstance(rows, list):  # cleared after every backward pass, so a list is a bug upstream
                raise RuntimeError("per-sample gradients accumulated over several backward passes")
            per_unit.index_add_(0, row_unit, rows)
        p.grad_sample = None
        out.append(per_unit)
    return out


def _chunks(units: list[Unit], max_rows: int) -> list[list[Unit]]:
    """Whole units, at most `max_rows` rows a chunk (a larger unit alone): bounds the per-row gradient memory."""
    out, current, rows = [], [], 0
    for u in units:
        if current and rows + u.rows > max_rows:
            out.append(current)
            current, rows = [], 0
        current.append(u)
        rows += u.rows
    return out + ([current] if current else [])


def unit_grad_samples(model: HydraScorer, units: list[Unit], params: list[nn.Parameter],
                      max_rows: int) -> tuple[float, int]:
    """Set every parameter's grad_sample to its per-unit gradients [len(units), ...], in the units' order, so
    the DPOptimizer clips and noises per unit. Forward and backward run over chunks of whole units (a unit's
    gradient is the sum of its rows', and no unit is split). Returns (sum of the units' losses, correct items)."""
    parts, loss_sum, correct = [], 0.0, 0
    for chunk in _chunks(units, max_rows):
        loss, right, row_unit = units_loss(model, chunk)
        loss.backward()
        parts.append(_per_unit(params, row_unit, len(chunk)))
        loss_sum, correct = loss_sum + loss.item(), correct + right
    for i, p in enumerate(params):
        p.grad_sample = torch.cat([part[i] for part in parts]) if parts else p.new_zeros((0, *p.shape))
    return loss_sum, correct


def grad_sample_hooks(model: HydraScorer) -> GradSampleHooks:
    """Opacus's per-sample-gradient hooks on what trains (top layers, feature weights, heads), attached in
    place (no wrapper, parameter names stay clean); the frozen part runs without autograd, so its feature
    cache stays valid.
    loss_reduction="sum": units_loss is a sum over units. Call .cleanup() when done."""
    trainable = nn.ModuleDict({"shared": nn.ModuleList(model.shared_modules()), "heads": model.heads})
    return GradSampleHooks(trainable, batch_first=True, loss_reduction="sum", strict=True)


def private_generator(device: torch.device) -> torch.Generator:
    """A torch generator seeded from OS entropy, independent of every public seed."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


@dataclass
class RecordDPSGD:
    """DP-SGD as training.train_stage's `private` option (training.PrivateSteps): Poisson-sampled batches of
    privacy units, per-unit gradients clipped to the plan's C and noised (Opacus's DPOptimizer around
    train_stage's AdamW), every noised step counted by the ledger's accountant."""

    dp_plan: Plan
    ledger: PrivacyLedger
    units: list[Unit] = field(default_factory=list)

    def plan(self, examples: list[Example], epochs: int) -> list[list[Unit]]:
        """The plan's steps, epoch by epoch (Opacus's Poisson 'epoch': 1 / sample rate steps), each a Poisson
        sample of the units drawn from a private generator. An empty batch still releases an all-noise step."""
        plan, self.units = self.dp_plan, privacy_units(examples)
        sampler = private_generator(torch.device("cpu"))
        steps = [[u for u, keep in zip(self.units, (torch.rand(len(self.units), generator=sampler)
                                                    < plan.sample_rate).tolist()) if keep]
                 for _ in range(plan.steps_per_round)]
        per_epoch = round(1 / plan.sample_rate)
        return [steps[e:e + per_epoch] for e in range(0, len(steps), per_epoch)]

    @contextmanager
    def steps(self, model: HydraScorer, params: list[nn.Parameter], opt: torch.optim.Optimizer, sched,
              anchor: list[torch.Tensor], proximal_mu: float) -> Iterator[Callable[[list[Unit]], training.Step]]:
        plan = self.dp_plan
        optimizer = DPOptimizer(opt, noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.clip,
                                expected_batch_size=plan.sample_rate * len(self.units), loss_reduction="mean",
                                generator=private_generator(model.device))
        optimizer.attach_step_hook(self.ledger.accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
        hooks = grad_sample_hooks(model)

        def step(batch: list[Unit]) -> training.Step:
            loss, right = unit_grad_samples(model, batch, params, plan.batch_size)
            _dp_step(optimizer, model, anchor, proximal_mu)
            sched.step()
            return training.Step({"loss": loss}, right, len(batch), weight=len(batch))

        try:
            with warnings.catch_warnings():
                # The first top layer's inputs need no gradient (frozen features): torch's note is expected.
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                yield step
        finally:
            optimizer.zero_grad(set_to_none=True)
            hooks.cleanup()


def train_record_dp(model: HydraScorer, examples: list[Example], ledger: PrivacyLedger, dp: DPSettings, *,
                    module: str, server_round: int, epochs: int, lr: float, head_lr: float | None = None,
                    batch_size: int, weight_decay: float = 0.01, seed: int = 0, proximal_mu: float = 0.0,
                    say: Say | None = None, lr_span: tuple[float, float] = (1.0, 0.0)) -> dict:
    """One round of record-level DP-SGD on `model` (train_stage with RecordDPSGD); saves the ledger.

    The first round fixes the plan (noise multiplier for all planned rounds); a round that would take epsilon
    past the cap is not run: the report says exhausted and nothing changes. Returns train_stage's report
    plus the privacy figures (see reply_metrics)."""
    start = time.perf_counter()
    units = privacy_units(examples)
    training.check_args([e for u in units for e in u.examples], epochs, batch_size, [lr, head_lr])
    if ledger.plan is None:
        ledger.plan = Plan.make(dp, len(units), sum(u.rows for u in units) / len(units), epochs, batch_size)
    plan = ledger.plan
    plan.check(dp, epochs, batch_size, ledger.path)
    k = item_units(units)
    base = {"units": len(units), "item_units": k, "examples": sum(len(u.examples) for u in units),
            "users": len({u.user_id for u in units}), "plan": plan, "delta": dp.delta}
    if dp.cap is not None and ledger.epsilon(dp.delta, plan.steps_per_round) > dp.cap + 1e-9:
        return {**base, "exhausted": True, "steps": 0, "total_steps": ledger.total_steps,
                "epsilon": ledger.epsilon(dp.delta), "item_epsilon": ledger.item_epsilon(dp.delta),
                "seconds": time.perf_counter() - start}
    report = training.train_stage(model, examples, epochs=epochs, lr=lr, head_lr=head_lr, batch_size=batch_size,
                                  weight_decay=weight_decay, seed=seed, proximal_mu=proximal_mu, progress=False,
                                  private=RecordDPSGD(plan, ledger), lr_span=lr_span)
    counted = ledger.total_steps - sum(r.steps for r in ledger.rounds)
    if counted != plan.steps_per_round:
        raise RuntimeError(f"the accountant counted {counted} steps this round, the plan has {plan.steps_per_round}")
    entry = RoundEntry(server_round, module, plan.steps_per_round, plan.sample_rate, plan.noise_multiplier, k,
                       epsilon=ledger.epsilon(dp.delta), item_epsilon=0.0)
    ledger.record(entry)
    entry.item_epsilon = ledger.item_epsilon(dp.delta)  # over every round so far, this one included
    ledger.save()  # before the caller saves the models: spent privacy is recorded before anything uses it
    if say:
        say(f"DP-SGD: {plan.steps_per_round} steps, {report['items']} units sampled, noise multiplier "
            f"{plan.noise_multiplier:.3f}, clip {plan.clip}")
        say(f"record-level DP {module} round {server_round}: epsilon {entry.epsilon:.3f} for a unit, "
            f"{entry.item_epsilon:.3f} for an item (K={k}) at delta {dp.delta:g}")
    return {**base, "loss": report["loss"], "accuracy": report["accuracy"], "sampled_units": report["items"],
            "exhausted": False, "steps": plan.steps_per_round, "total_steps": ledger.total_steps,
            "epsilon": entry.epsilon, "item_epsilon": entry.item_epsilon, "seconds": time.perf_counter() - start}


def _dp_step(optimizer: DPOptimizer, model: HydraScorer, anchor: list[torch.Tensor], proximal_mu: float) -> None:
    """Clip per unit, noise, account (pre_step), then the update. FedProx's proximal term depends on no data,
    so its gradient is added after the noise (post-processing) rather than clipped with the units."""
    if optimizer.pre_step():
        if proximal_mu:
            for p, a in zip(model.trainable_base_parameters(), anchor):
                p.grad = p.grad + proximal_mu * (p.detach() - a)
        optimizer.original_optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def reply_metrics(report: dict) -> dict[str, float]:
    """The record-level privacy statement of a train reply, numbers only (the server's federated.json):
    dp-exhausted        1 when the budget is spent: the client did not train and returned its arrays unchanged
    dp-epsilon-spent    cumulative epsilon for one unit (one pseudo-query) after this round, at dp-delta
    dp-item-epsilon     cumulative group-privacy epsilon for one profile item, at dp-delta (inf: no bound)
    dp-item-units       K: the most units one item enters in this round's module
    dp-delta            the delta of both epsilons
    dp-noise-multiplier z, fixed for the whole planned training; noise std is z * dp-clip per step
    dp-clip             C, the clip norm of one unit's gradient
    dp-sample-rate      q, the Poisson sampling probability of each unit per step
    dp-steps            DP-SGD steps this round (0 when exhausted)
    dp-total-steps      DP-SGD steps of this client over all rounds, runs and restarts
    dp-units            privacy units (pseudo-queries) of this round's module"""
    plan: Plan = report["plan"]
    return {p.DP_EXHAUSTED: int(report["exhausted"]), p.DP_EPSILON: float(report["epsilon"]),
            p.DP_ITEM_EPSILON: float(report["item_epsilon"]), p.DP_ITEM_UNITS: int(report["item_units"]),
            p.DP_DELTA: float(report["delta"]), p.DP_NOISE_MULTIPLIER: float(plan.noise_multiplier),
            p.DP_CLIP: float(plan.clip), p.DP_SAMPLE_RATE: float(plan.sample_rate),
            p.DP_STEPS: int(report["steps"]), p.DP_TOTAL_STEPS: int(report["total_steps"]),
            p.DP_UNITS: int(report["units"])}

