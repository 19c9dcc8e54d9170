"""User-level central differential privacy of the shared arrays (setting dp=user), with Flower's own parts.

- Clipping: each client's update (the arrays it returns minus those it got) is clipped to L2 norm C on the
  client by Flower's `fixedclipping_mod` (client/client_app.py puts it on the train handler).
- Noise and accounting: Flower's `DifferentialPrivacyClientSideFixedClipping` around the FedAvg that
  server/strategy.py builds adds Gaussian noise of std z*C/n to the mean of the n updates and composes one
  `GaussianPrivacyEvent` per release on Flower's `RdpAccountant` (add-or-remove-one client, no sampling
  amplification). Only FedAvg is allowed: the accounted wrapper needs FedAvg's uniform mean, and every
  client sends num-examples = 1 (equal weights; weighting by data size would break the sensitivity bound).
- One ledger for the whole run (the reranker's rounds, then the adapter's): its JSON state goes into every
  checkpoint (server/checkpoint.py), so a resumed run continues the same ledger.
- Budget: a round whose release would exceed max-epsilon is refused before anything is sent
  (`PrivacyBudgetExhausted`); the ServerApp then ends the run cleanly with that status.
- Dropouts: a release needs exactly the n replies the noise was sized for. With fewer, Flower's wrapper
  returns no aggregate and composes nothing: FedHydra keeps the arrays as they were, records the round as
  skipped and spends no epsilon. This is the fixed denominator: a mean over fewer clients would have a
  larger sensitivity (C/m > C/n) than the noise covers, and nothing is released instead.
- Noise randomness comes from the OS, never the run seed (`os_entropy_numpy`).
The noise multiplier is given (dp-noise-multiplier) or computed once from dp-epsilon for the planned
releases, 2 x rounds (`noise_multiplier_for`). SecAgg+ rounds (server/secagg.py) add the same noise to the
securely summed mean with `add_noise` and compose the same events.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterable, Iterator

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, Strategy
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv

from fedhydra.common.protocol import MODULES

ACCOUNTANT = "Flower 1.41 RdpAccountant (Google dp-accounting, RDP)"


def _accountant(config: PrivacyConfig):
    from flwr.serverapp import RdpAccountant  # lazy in Flower: needs flwr[dp]

    return RdpAccountant(config)


def _config(delta: float, population: int, max_epsilon: float | None = None) -> PrivacyConfig:
    return PrivacyConfig(target_delta=delta, population_size=population,
                         neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                         sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=max_epsilon)


def epsilon_after(noise_multiplier: float, delta: float, releases: int) -> float:
    """Epsilon at `delta` after `releases` Gaussian releases of multiplier z (no amplification)."""
    if releases == 0:
        return 0.0
    accountant = _accountant(_config(delta, 1))
    accountant.compose(GaussianPrivacyEvent(noise_multiplier, 1, 1), count=releases)
    return accountant.get_epsilon(delta)


def noise_multiplier_for(epsilon: float, delta: float, releases: int, rel_tol: float = 1e-4) -> float:
    """The smallest noise multiplier (to `rel_tol`) whose `releases` releases spend at most `epsilon`,
    by bisection on Flower's accountant (epsilon falls as the multiplier grows)."""
    if epsilon <= 0 or releases < 1:
        raise ValueError(f"dp-epsilon must be > 0 and releases >= 1, got {epsilon} and {releases}")
    hi = 1.0
    while epsilon_after(hi, delta, releases) > epsilon:
        hi *= 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {epsilon} at delta {delta} in {releases} releases")
    lo = hi / 2
    while epsilon_after(lo, delta, releases) <= epsilon and lo > 1e-6:
        hi, lo = lo, lo / 2
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        if epsilon_after(mid, delta, releases) <= epsilon:
            hi = mid
        else:
            lo = mid
    return hi  # the side that meets the target


@contextlib.contextmanager
def os_entropy_numpy() -> Iterator[None]:
    """NumPy's global RNG seeded from the OS for the block, then put back as it was.

    Flower's DP code draws its noise with `np.random.normal` (the global legacy RNG), and FedHydra seeds its
    RNGs from the public run seed for reproducible reruns, so without this anyone who knows the seed could
    recompute and subtract the noise. 256 bits from `secrets` seed the Mersenne Twister for the block only;
    restoring the state afterwards keeps everything else as reproducible as before and never exposes the
    noise's state. MT19937 is not a cryptographic generator (nor is Opacus's default without secure_mode);
    its seed, not its algorithm, is what the run seed must not determine.
    """
    saved = np.random.get_state()
    np.random.seed(np.frombuffer(secrets.token_bytes(32), dtype=np.uint32))
    try:
        yield
    finally:
        np.random.set_state(saved)


class UserLevelDP:
    """The run's central-DP parameters and its privacy ledger (one RdpAccountant for all releases)."""

    def __init__(self, noise_multiplier: float, clip: float, delta: float, population: int,
                 max_epsilon: float | None = None, planned_releases: int = 0, source: str = "given"):
        if noise_multiplier <= 0 or clip <= 0:
            raise ValueError(f"dp=user needs a positive noise multiplier and clip norm, got {noise_multiplier} "
                             f"and {clip}")
        self.noise_multiplier, self.clip, self.delta = float(noise_multiplier), float(clip), float(delta)
        self.max_epsilon, self.population = max_epsilon, int(population)
        self.planned_releases, self.source = planned_releases, source
        self.accountant = _accountant(_config(self.delta, self.population, max_epsilon))

    @classmethod
    def from_settings(cls, values: dict) -> UserLevelDP | None:
        """The dp=user parameters of the settings (None for dp off or record); refuses what cannot be private."""
        if values["dp"] != "user":
            return None
        if values["strategy"] != "fedavg":
            raise ValueError(f"dp=user needs strategy fedavg, got {values['strategy']!r}: Flower's accounted DP "
                             "wrapper averages the clipped updates with FedAvg's uniform mean, and the noise is "
                             "sized for that mean")
        releases = len(MODULES) * int(values["rounds"])  # every module's rounds release
        target, given = float(values["dp-epsilon"]), float(values["dp-noise-multiplier"])
        if target > 0:
            z = noise_multiplier_for(target, float(values["dp-delta"]), releases)
            source = f"computed from dp-epsilon {target} for {releases} releases"
        elif given > 0:
            z, source = given, "given (dp-noise-multiplier)"
        else:
            raise ValueError("dp=user needs dp-epsilon (a target for the whole training) or dp-noise-multiplier")
        cap = float(values["dp-max-epsilon"]) or target or None
        return cls(z, float(values["dp-clip"]), float(values["dp-delta"]), int(values["clients"]), cap, releases,
                   source)

    # ---- the ledger
    @property
    def releases(self) -> int:
        return self.accountant.num_releases

    @property
    def epsilon(self) -> float:
        return self.accountant.get_epsilon(self.delta) if self.releases else 0.0

    def event(self, sample_size: int) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(self.noise_multiplier, sample_size, self.population)

    def check_budget(self, sample_size: int) -> None:
        """Raise PrivacyBudgetExhausted when the next release (of `sample_size` updates) would pass max-epsilon."""
        if sample_size > self.population:
            raise ValueError(f"dp=user: {sample_size} sampled train clients but the accountant's population (the "
                             f"clients setting) is {self.population}; set clients to the number of train clients")
        if self.max_epsilon is not None and self.accountant.would_exceed(self.event(sample_size)):
            projected = epsilon_after(self.noise_multiplier, self.delta, self.releases + 1)
            raise PrivacyBudgetExhausted(f"the next release would spend epsilon {projected:.4f} > dp-max-epsilon "
                                         f"{self.max_epsilon} (spent {self.epsilon:.4f} in {self.releases} releases)")

    def state_dict(self) -> dict:
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state)

    # ---- Message API rounds: Flower's wrapper
    def wrap(self, strategy: Strategy, sample_size: int) -> DifferentialPrivacyClientSideFixedClipping:
        """Flower's accounted client-side-clipping wrapper for one round of `sample_size` clients (the noise
        std z*C/n is sized for exactly that many updates), composing into this run's accountant."""
        if not isinstance(strategy, FedAvg) or type(strategy).aggregate_train is not FedAvg.aggregate_train:
            raise ValueError(f"dp=user needs Flower's FedAvg, got {type(strategy).__name__}")
        return DifferentialPrivacyClientSideFixedClipping(strategy, self.noise_multiplier, self.clip, sample_size,
                                                          accountant=self.accountant)

    def aggregate(self, wrapper: DifferentialPrivacyClientSideFixedClipping, server_round: int,
                  replies: Iterable[Message]) -> ArrayRecord | None:
        """The wrapper's noised mean, its noise drawn from OS entropy; None when the round released nothing."""
        with os_entropy_numpy():
            arrays, _ = wrapper.aggregate_train(server_round, replies)
        return arrays

    # ---- SecAgg+ rounds: the server only ever holds the securely summed mean
    def add_noise(self, mean: list[np.ndarray], sample_size: int) -> None:
        """Noise the mean of `sample_size` clipped updates in place, as Flower's wrapper does (same std, same
        Flower functions), and compose the release. Written out because Flower's DP wrappers need the
        individual replies, which SecAgg+ hides, and its legacy wrapper accounts nothing."""
        event = self.event(sample_size)
        with os_entropy_numpy():
            add_gaussian_noise_inplace(mean, compute_stdv(self.noise_multiplier, self.clip, sample_size))
        self.accountant.compose(event)

    def noise_std(self, sample_size: int) -> float:
        return compute_stdv(self.noise_multiplier, self.clip, sample_size)
