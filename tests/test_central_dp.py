"""User-level central DP (dp=user) on the server's real loop with the clients' real privacy mods (in one
process, tests/fake_federation.py): the ledger against an independent Flower accountant, resume, the budget
stop, clipping, noise that the seed does not fix, dropouts, refused configurations and the statement."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

from fake_federation import NODES, FakeFederation, enter_run, norm, small_models, values_for
from fedhydra.server import checkpoint
from fedhydra.server.central_dp import UserLevelDP, epsilon_after, noise_multiplier_for
from fedhydra.server.privacy_statement import markdown_lines
from fedhydra.server.server_app import privacy_setup, run

Z = 1.3


@pytest.fixture(autouse=True)
def run_identity(monkeypatch):
    enter_run(monkeypatch)
    small_models(monkeypatch)


def _run(out, drop=None, **extra):
    values = values_for(out, **({"dp": "user", "dp-noise-multiplier": Z} | extra))
    np.random.seed(values["seed"])  # what a seeded run does: the public seed fixes numpy's global RNG
    random.seed(values["seed"])
    fed = FakeFederation(values, drop)
    return run(fed, values), fed


def _independent(epsilons_released: list[bool], z: float = Z) -> list[float]:
    acc = RdpAccountant(PrivacyConfig(target_delta=1e-5, population_size=len(NODES),
                                      neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                      sampling_method=SamplingMethod.NO_AMPLIFICATION))
    out = []
    for released in epsilons_released:
        if released:
            acc.compose(GaussianPrivacyEvent(z, len(NODES), len(NODES)))
        out.append(acc.get_epsilon(1e-5) if acc.num_releases else 0.0)
    return out


def _final(out) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    progress = json.loads((out / "checkpoint" / "progress.json").read_text())
    return load_file(str(out / "checkpoint" / progress["weights"]))


def test_epsilon_after_each_round_equals_an_independent_flower_accountant(tmp_path):
    doc, fed = _run(tmp_path / "federated")
    assert doc["status"] == "done" and fed.train_rounds_sent() == [1, 2, 3, 4]
    eps = [r["epsilon"] for r in doc["rounds"]]
    assert eps == pytest.approx(_independent([True] * 4), rel=1e-12)
    assert all(b > a for a, b in zip(eps, eps[1:]))  # non-decreasing: strictly growing with each release
    privacy = doc["privacy"]
    assert [r["epsilon"] for r in privacy["epsilon_per_round"]] == eps and privacy["epsilon"] == eps[-1]
    assert privacy["noise_multiplier"] == Z and privacy["clip_norm"] == 1.0 and privacy["releases"] == 4
    assert privacy["unit_protected"].startswith("user") and "add-or-remove-one" in privacy["neighbouring_relation"]
    assert "no amplification" in privacy["sampling"] and "RdpAccountant" in privacy["accountant"]
    assert any("remote LLM provider" in item or "llm=openai" in item for item in privacy["not_covered"])
    md = "\n".join(markdown_lines(privacy))
    assert f"| 4 | {eps[-1]:.4f} |" in md and "not covered" in md and "z = 1.3" in md


def test_resume_continues_the_ledger_to_the_uninterrupted_epsilon(tmp_path):
    whole, _ = _run(tmp_path / "a")
    stopped, _ = _run(tmp_path / "b", **{"stop-after-round": 1})
    assert stopped["status"] == "stopped after round 1" and stopped["privacy"]["releases"] == 1
    ledger = checkpoint.load_privacy(tmp_path / "b" / "checkpoint")
    assert len(ledger["compositions"]) == 1  # Flower's accountant state, committed with round 1
    resumed, fed = _run(tmp_path / "b", resume=True)
    assert fed.train_rounds_sent() == [2, 3, 4]
    assert resumed["privacy"]["releases"] == 4
    assert resumed["privacy"]["epsilon"] == pytest.approx(whole["privacy"]["epsilon"], rel=1e-12)
    assert [r["epsilon"] for r in resumed["rounds"]] == pytest.approx([r["epsilon"] for r in whole["rounds"]])


def test_a_round_that_would_pass_max_epsilon_is_not_sent_and_the_run_ends_cleanly(tmp_path):
    cap = (epsilon_after(Z, 1e-5, 2) + epsilon_after(Z, 1e-5, 3)) / 2
    doc, fed = _run(tmp_path / "federated", **{"dp-max-epsilon": cap})
    assert doc["status"] == "privacy budget exhausted"
    assert fed.train_rounds_sent() == [1, 2]  # round 3 was refused before any train message
    assert "before round 3" in doc["privacy"]["stopped"] and doc["privacy"]["epsilon"] <= cap
    on_disk = json.loads((tmp_path / "federated" / "federated.json").read_text())
    assert on_disk["status"] == "privacy budget exhausted" and "evaluation" not in on_disk
    assert json.loads((tmp_path / "federated" / "checkpoint" / "progress.json").read_text())["round"] == 2


def test_each_client_update_leaves_clipped_to_the_norm_with_only_cost_metrics(tmp_path):
    clip = 0.5
    _, fed = _run(tmp_path / "federated", **{"dp-clip": clip})
    assert len(fed.replies) == 4 * len(NODES)
    for r in fed.replies:  # what left each node, after Flower's fixedclipping_mod
        arrays = {k: a.numpy() for k, a in r["content"]["arrays"].items()}
        update = {k: arrays[k] - r["sent"][k] for k in arrays}
        assert norm(update) <= clip * (1 + 1e-5)
        raw = next(x["update"] for x in fed.raw if (x["node"], x["round"]) == (r["node"], r["round"]))
        if norm(raw) > clip:  # a long update is scaled onto the ball's surface, in its own direction
            assert norm(update) == pytest.approx(clip, rel=1e-4)
        else:
            for k in update:
                np.testing.assert_allclose(update[k], raw[k], atol=1e-6)
        assert dict(r["content"]["metrics"]) == {"num-examples": 1, "llm-calls": 4, "tokens": 321, "cache-hits": 0,
                                                 "seconds": 0.01}  # no loss, accuracy or counts of the data
    assert {x["node"] for x in fed.raw if norm(x["update"]) > clip} == {12, 13}


def test_noise_is_drawn_from_os_entropy_with_the_planned_std(tmp_path):
    _, fed_a = _run(tmp_path / "a")
    _run(tmp_path / "b")  # same seed, same settings, same client updates
    a, b = _final(tmp_path / "a"), _final(tmp_path / "b")
    assert all(not np.allclose(a[k], b[k]) for k in a)
    # round 2's message carries round 1's release: the mean of the clipped models plus noise of std z*C/n
    sent2 = next(m["sent"] for m in fed_a.replies if m["round"] == 2)
    models1 = [{k: a.numpy() for k, a in m["content"]["arrays"].items()} for m in fed_a.replies if m["round"] == 1]
    noise = sent2["reranker/base/w"] - np.mean([m["reranker/base/w"] for m in models1], axis=0)
    assert noise.std() == pytest.approx(Z * 1.0 / len(NODES), rel=0.03) and abs(noise.mean()) < 0.01


def test_a_client_that_drops_out_makes_the_round_release_nothing(tmp_path):
    doc, fed = _run(tmp_path / "federated", drop={2: 13})
    assert doc["status"] == "done"
    skipped = doc["rounds"][1]
    assert skipped["released"] is False and "2 of 3" in skipped["note"] and skipped["clients"] == 2
    eps = [r["epsilon"] for r in doc["rounds"]]
    assert eps == pytest.approx(_independent([True, False, True, True]), rel=1e-12)
    assert eps[1] == eps[0] and doc["privacy"]["releases"] == 3
    assert doc["privacy"]["epsilon_per_round"][1]["released"] is False
    # the reranker stays as round 1 released it: the adapter rounds' install carried round 2's input
    round2_input = next(r["sent"] for r in fed.replies if r["round"] == 2)
    final = _final(tmp_path / "federated")
    for k in round2_input:
        np.testing.assert_array_equal(final[k], round2_input[k])


def test_noise_multiplier_from_a_target_epsilon(tmp_path):
    z = noise_multiplier_for(6.0, 1e-5, 6)
    assert epsilon_after(z, 1e-5, 6) <= 6.0 < epsilon_after(z * 0.999, 1e-5, 6)
    assert z == pytest.approx(2.0, abs=0.01)  # PRIVACY.md: z = 2 gives 5.98 after 6 releases
    doc, _ = _run(tmp_path / "federated", **{"dp-epsilon": 3.0, "dp-noise-multiplier": 0.0})
    assert doc["status"] == "done" and doc["privacy"]["epsilon"] <= 3.0 and doc["privacy"]["max_epsilon"] == 3.0
    assert doc["privacy"]["noise_multiplier"] == pytest.approx(noise_multiplier_for(3.0, 1e-5, 4))
    assert "computed from dp-epsilon 3.0 for 4 releases" in doc["privacy"]["noise_multiplier_source"]


@pytest.mark.parametrize("extra, message", [
    ({"dp": "user", "dp-noise-multiplier": 1.0, "strategy": "fedadam"}, "need.? strategy fedavg"),
    ({"secagg": True, "strategy": "fedprox"}, "need.? strategy fedavg"),
    ({"dp": "user"}, "dp-epsilon .* or dp-noise-multiplier"),
    ({"secagg": True, "fraction-train": 0.5}, "at least 2 sampled train clients"),
    ({"dp": "user", "dp-noise-multiplier": 1.0, "clients": 2}, "set clients=3"),
])
def test_configurations_that_cannot_run_privately_are_refused(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        privacy_setup(values_for(tmp_path, **extra), list(NODES))
    assert privacy_setup(values_for(tmp_path, dp="record"), list(NODES)) is None  # record mode: no server noise


def test_a_resume_under_other_privacy_settings_is_refused(tmp_path):
    _run(tmp_path / "federated", **{"stop-after-round": 1})
    base = values_for(tmp_path / "federated", dp="user", **{"dp-noise-multiplier": Z})
    fp = checkpoint.fingerprint(base)
    assert checkpoint.load(tmp_path / "federated" / "checkpoint", fp)[0] == 1
    for changed in ({"dp-noise-multiplier": 2.0}, {"dp-clip": 0.5}, {"dp-delta": 1e-6}, {"dp-max-epsilon": 9.0},
                    {"dp": "off"}, {"secagg": True}, {"dp-epsilon": 5.0}):
        with pytest.raises(ValueError, match="other settings"):
            checkpoint.load(tmp_path / "federated" / "checkpoint", checkpoint.fingerprint({**base, **changed}))
    with pytest.raises(ValueError, match="other settings"):  # and the ServerApp itself refuses
        _run(tmp_path / "federated", resume=True, **{"dp-noise-multiplier": 2.0})


def test_several_users_per_client_state_the_per_client_unit_and_a_user_bound(tmp_path):
    doc, _ = _run(tmp_path / "federated", **{"users-per-client": 3})
    privacy = doc["privacy"]
    assert privacy["unit_protected"].startswith("client (3 users per client)")
    bound = privacy["user_epsilon_bound"]
    assert bound["epsilon"] == pytest.approx(epsilon_after(Z / 2, 1e-5, 4)) and bound["epsilon"] > privacy["epsilon"]
    assert "a single user of a multi-user client" in "\n".join(markdown_lines(privacy))


def test_user_level_dp_only_wraps_flowers_fedavg():
    from flwr.serverapp.strategy import FedAdam

    dp = UserLevelDP(1.0, 1.0, 1e-5, 3)
    with pytest.raises(ValueError, match="Flower's FedAvg"):
        dp.wrap(FedAdam(), 3)
