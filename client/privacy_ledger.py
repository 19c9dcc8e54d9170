"""A client's record-level privacy ledger: the plan it promised and the privacy it has spent.

STATE/privacy.json (written atomically, never leaves the client) holds
- plan: the noise multiplier, fixed once for the whole planned training (every round of both modules),
  with the Poisson sample rate and steps per round it was computed for. Every later round runs with
  exactly these, so the planned epsilon is what the whole training spends.
- accountant: Opacus's RDPAccountant.state_dict(), its history of (noise multiplier, sample rate, steps).
  It is loaded before and saved after every round, so epsilon accumulates across rounds, runs and
  restarts (Flower's Opacus example builds a new accountant each round and so resets it).
- rounds: one entry per trained round (server round, module, steps, the group size K of an item),
  from which the item-level epsilon is computed.

Epsilon for a unit (one pseudo-query, client/privacy.py) is the accountant's: RDP of the Poisson-subsampled
Gaussian (Mironov, Talwar, Zhang 2019), add-or-remove-one-unit neighbours, converted at delta.

Epsilon for a profile item (group privacy). An item's content enters K units (as the pseudo-query, a
retrieved pair, or among the items the adapter's prompt was chosen from). Adding, removing or changing the
item changes up to K units. The conversion, via RDP (the (K eps, K e^((K-1) eps) delta) bound is not used: its
delta exceeds 1 at the epsilons DP-SGD reaches here):
1. Group of K units added or removed: the sampled part of the group is a mixture of gradient shifts of norm
   <= K*C that occurs with probability q_K = 1 - (1-q)^K. exp((a-1) D_a) is convex in either argument, so
   the mixture is bounded by its worst component: a subsampled Gaussian with sample rate q_K and noise
   multiplier z/K, in both directions as for one unit. Its RDP is composed over the rounds, each with the
   K of its module.
2. The item's neighbour differs by removing its K units and adding their changed versions: two group steps,
   joined by RDP's weak triangle inequality (Mironov 2017, Prop. 11, p = q = 2):
   D_a(P||R) <= (a - 1/2)/(a - 1) D_2a(P||Q) + D_(2a-1)(Q||R); then converted at delta as Opacus does.
K is computed on the client's own data; it is reported in the clear and is itself not private.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# opacus.utils.module_utils calls logging.basicConfig when imported, which gives the root logger a handler;
# Flower's logger propagates to the root, so every Flower log line would then be printed twice.
_root_handlers = list(logging.root.handlers)
import opacus  # noqa: E402
logging.root.handlers[:] = _root_handlers

from opacus.accountants import RDPAccountant  # noqa: E402
from opacus.accountants.analysis import rdp as rdp_analysis  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402

from fedhydra.common.files import write_atomic
from fedhydra.common.protocol import MODULES

FORMAT = "fedhydra-privacy/1"
EPSILON_TOLERANCE = 0.01  # get_noise_multiplier's search precision: the plan spends at most the target


class PrivacyError(ValueError):
    """Record-level DP settings are missing or contradict what this client's ledger was planned with."""


@dataclass(frozen=True)
class DPSettings:
    """The privacy settings (common/settings.py, group "privacy") a client trains under, plus the planned
    rounds per module. `epsilon` > 0: the noise multiplier is computed from it; else `noise_multiplier` is used."""

    mode: str
    epsilon: float
    noise_multiplier: float
    clip: float
    delta: float
    max_epsilon: float
    rounds: int

    def __post_init__(self):
        if self.mode not in ("off", "user", "record"):
            raise PrivacyError(f"dp must be off, user or record, got {self.mode!r}")
        if self.mode != "record":
            return
        if not self.epsilon > 0 and not self.noise_multiplier > 0:
            raise PrivacyError("dp=record needs dp-epsilon > 0 (the noise is computed from it) "
                               "or dp-noise-multiplier > 0")
        if not self.clip > 0:
            raise PrivacyError(f"dp-clip must be > 0, got {self.clip}")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"dp-delta must be in (0, 1), got {self.delta}")
        if self.max_epsilon < 0 or self.epsilon < 0 or self.noise_multiplier < 0:
            raise PrivacyError("dp-epsilon, dp-noise-multiplier and dp-max-epsilon must not be negative")
        if self.rounds < 1:
            raise PrivacyError(f"rounds must be at least 1, got {self.rounds}")

    @classmethod
    def from_settings(cls, values: dict) -> "DPSettings":
        return cls(str(values["dp"]), float(values["dp-epsilon"]), float(values["dp-noise-multiplier"]),
                   float(values["dp-clip"]), float(values["dp-delta"]), float(values["dp-max-epsilon"]),
                   int(values["rounds"]))

    @property
    def cap(self) -> float | None:
        """The epsilon a client never exceeds: dp-max-epsilon, else dp-epsilon, else none."""
        return self.max_epsilon or self.epsilon or None


@dataclass(frozen=True)
class Plan:
    """What the noise multiplier was computed for: `releases` rounds of `steps_per_round` Poisson steps."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    releases: int
    target_epsilon: float  # 0: the noise multiplier was given
    delta: float
    clip: float
    epochs: int
    batch_size: int

    @classmethod
    def make(cls, dp: DPSettings, units: int, rows_per_unit: float, epochs: int, batch_size: int) -> "Plan":
        """Opacus's convention: a Poisson 'epoch' is ceil(units / expected batch) steps at rate 1/steps.
        The expected batch holds about `batch_size` rows, i.e. batch_size / rows_per_unit units."""
        if units < 1:
            raise PrivacyError("no privacy units to plan for")
        expected = max(1, round(batch_size / max(rows_per_unit, 1.0)))
        steps_per_epoch = math.ceil(units / expected)
        rate, per_round = 1.0 / steps_per_epoch, epochs * steps_per_epoch
        releases = dp.rounds * len(MODULES)  # the reranker's rounds, then the adapter's (server/server_app.py)
        z = dp.noise_multiplier
        if dp.epsilon > 0:
            try:
                z = get_noise_multiplier(target_epsilon=dp.epsilon, target_delta=dp.delta, sample_rate=rate,
                                         steps=per_round * releases, accountant="rdp",
                                         epsilon_tolerance=EPSILON_TOLERANCE)
            except ValueError as exc:  # Opacus: "The privacy budget is too low."
                raise PrivacyError(f"dp-epsilon={dp.epsilon} cannot be met over {per_round * releases} steps at "
                                   f"sample rate {rate:.3g} and dp-delta={dp.delta} ({exc})") from exc
        return cls(float(z), rate, per_round, releases, dp.epsilon, dp.delta, dp.clip, epochs, batch_size)

    def check(self, dp: DPSettings, epochs: int, batch_size: int, where: Path) -> None:
        """Refuse settings that would make this plan's noise multiplier wrong (privacy spent cannot be undone)."""
        pairs = {"dp-epsilon": (self.target_epsilon, dp.epsilon), "dp-delta": (self.delta, dp.delta),
                 "dp-clip": (self.clip, dp.clip), "rounds": (self.releases // len(MODULES), dp.rounds),
                 "epochs": (self.epochs, epochs), "batch-size": (self.batch_size, batch_size)}
        if not self.target_epsilon:  # the noise multiplier was given, not computed
            pairs["dp-noise-multiplier"] = (self.noise_multiplier, dp.noise_multiplier)
        differ = [f"{k} {a} -> {b}" for k, (a, b) in pairs.items() if not math.isclose(float(a), float(b))]
        if differ:
            raise PrivacyError(f"the privacy ledger {where} was planned under other settings ({'; '.join(differ)}); "
                               "privacy already spent cannot be undone: run with the same settings, or start a "
                               "fresh client state folder")


@dataclass
class RoundEntry:
    round: int
    module: str
    steps: int
    sample_rate: float
    noise_multiplier: float
    item_units: int  # K of this round's module
    epsilon: float  # for a unit, after this round
    item_epsilon: float


@dataclass
class PrivacyLedger:
    """The ledger of one client (see the module docstring); `accountant` is live Opacus state."""

    path: Path
    plan: Plan | None = None
    accountant: RDPAccountant = field(default_factory=RDPAccountant)
    rounds: list[RoundEntry] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PrivacyLedger":
        """The ledger at `path`, or an empty one when the client has spent nothing yet."""
        path = Path(path)
        if not path.is_file():
            return cls(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise PrivacyError(f"cannot read the privacy ledger {path}: {exc}") from exc
        if raw.get("format") != FORMAT:
            raise PrivacyError(f"{path}: format {raw.get('format')!r}, expected {FORMAT!r}")
        accountant = RDPAccountant()
        state = raw["accountant"]
        state["history"] = [tuple(h) for h in state["history"]]
        accountant.load_state_dict(state)
        ledger = cls(path, Plan(**raw["plan"]) if raw["plan"] else None, accountant,
                     [RoundEntry(**r) for r in raw["rounds"]])
        if ledger.total_steps != sum(r.steps for r in ledger.rounds):
            raise PrivacyError(f"{path}: the accountant's steps ({ledger.total_steps}) differ from its rounds' "
                               f"({sum(r.steps for r in ledger.rounds)}); the ledger is corrupt")
        return ledger

    def save(self) -> None:
        doc = {"format": FORMAT, "plan": asdict(self.plan) if self.plan else None,
               "accountant": {**self.accountant.state_dict(),
                              "history": [list(h) for h in self.accountant.history]},
               "rounds": [asdict(r) for r in self.rounds]}
        # durable: on disk before the round's reply, so a crash must not undercount
        write_atomic(self.path, json.dumps(doc, indent=1) + "\n", durable=True)

    @property
    def total_steps(self) -> int:
        return sum(int(steps) for _, _, steps in self.accountant.history)

    def epsilon(self, delta: float, extra_steps: int = 0) -> float:
        """Epsilon spent for one unit, or what it would be after `extra_steps` more planned steps."""
        history = list(self.accountant.history)
        if extra_steps:
            history.append((self.plan.noise_multiplier, self.plan.sample_rate, extra_steps))
        if not history:
            return 0.0
        probe = RDPAccountant()
        probe.history = history
        return float(probe.get_epsilon(delta))

    def item_epsilon(self, delta: float) -> float:
        return item_epsilon([(r.noise_multiplier, r.sample_rate, r.steps, r.item_units) for r in self.rounds], delta)

    def record(self, entry: RoundEntry) -> None:
        self.rounds.append(entry)


def item_epsilon(events: list[tuple[float, float, int, int]], delta: float) -> float:
    """Epsilon at `delta` for a profile item whose content enters K units, over events of
    (noise multiplier, sample rate, steps, K); the conversion is in the module docstring."""
    events = [e for e in events if e[2] > 0]
    if not events:
        return 0.0
    orders = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)

    def group_rdp(at: np.ndarray) -> np.ndarray:
        return sum(rdp_analysis.compute_rdp(q=1.0 - (1.0 - q) ** k, noise_multiplier=z / k, steps=steps,
                                            orders=list(at)) for z, q, steps, k in events)

    rdp = (orders - 0.5) / (orders - 1) * group_rdp(2 * orders) + group_rdp(2 * orders - 1)
    with warnings.catch_warnings():  # "optimal order is the smallest/largest alpha": expected for large groups
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=list(rdp), delta=delta)
    return float(eps)
