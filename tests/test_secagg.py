"""SecAgg+ rounds (secagg=true) on the server's real loop and Flower's real SecAgg+ workflow and mods, in one
process (tests/fake_federation.py): the secure mean is the plain mean of the clipped deltas within the
quantization tolerance, no clear update leaves a client, and central DP noises the masked mean."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fake_federation import NODES, FakeFederation, enter_run, norm, small_models, values_for
from fedhydra.server.central_dp import epsilon_after
from fedhydra.server.secagg import QUANTIZATION_RANGE
from fedhydra.server.server_app import run

MASKED_STAGE_KEYS = {"pk1", "pk2", "dsts", "ctxts", "masked_params", "nids", "shares"}


@pytest.fixture(autouse=True)
def run_identity(monkeypatch):
    enter_run(monkeypatch)
    small_models(monkeypatch)


def _run(out, drop=None, **extra):
    values = values_for(out, secagg=True, **extra)
    fed = FakeFederation(values, drop)
    return run(fed, values), fed


def _results(out, fed: FakeFederation) -> dict[int, dict[str, np.ndarray]]:
    """Round -> the module's arrays that round released: the next round's input, or the final checkpoint."""
    from safetensors.numpy import load_file

    final = load_file(str(out / "checkpoint" / "round-4.safetensors"))
    inputs = {r["round"]: r["sent"] for r in fed.inner}
    return {1: inputs[2], 2: {k: final[k] for k in inputs[2]}, 3: inputs[4], 4: {k: final[k] for k in inputs[4]}}


def _plain_mean(fed: FakeFederation, server_round: int) -> dict[str, np.ndarray]:
    """What each client put into SecAgg+ (sent + clipped delta, recorded before masking), averaged in the clear."""
    mine = [r for r in fed.inner if r["round"] == server_round]
    sent = mine[0]["sent"]
    return {k: sent[k] + np.mean([(r["returned"][k] - r["sent"][k]).astype(np.float64) for r in mine], axis=0)
            for k in sent}


def test_the_secure_mean_is_the_plain_mean_within_the_quantization_tolerance(tmp_path):
    doc, fed = _run(tmp_path)
    assert doc["status"] == "done" and fed.train_rounds_sent() == [1, 2, 3, 4]
    assert all(r["clients"] == 3 and r["sent_to"] == 3 for r in doc["rounds"])
    step = 2 * 1.0 / QUANTIZATION_RANGE  # one quantization level of [-C, C]
    for server_round, released in _results(tmp_path, fed).items():
        expected = _plain_mean(fed, server_round)
        for k in expected:
            np.testing.assert_allclose(released[k], expected[k], rtol=0, atol=step + 1e-7)
        # and not trivially: the deltas differ a lot between clients
        key = "reranker/base/w" if server_round <= 2 else "adapter/base/w"
        deltas = [r["returned"][key] - r["sent"][key] for r in fed.inner if r["round"] == server_round]
        assert np.abs(deltas[0] - deltas[1]).max() > 100 * step
    for r in fed.inner:  # every delta went in clipped: no value saturates at +-clipping_range
        assert norm({k: r["returned"][k] - r["sent"][k] for k in r["sent"]}) <= 1.0 * (1 + 1e-5)
    privacy = json.loads((tmp_path / "federated.json").read_text())["privacy"]
    assert privacy["secure_aggregation"] is True and privacy["secagg"]["clipping_range"] == 1.0


def test_no_clear_update_leaves_a_client_under_secagg(tmp_path):
    _, fed = _run(tmp_path)
    stages = [r for r in fed.replies if r["round"] == 0]
    fits = [r for r in fed.replies if r["round"]]
    assert len(fits) == 4 * len(NODES) and len(stages) == 3 * 4 * len(NODES)  # 3 key/unmask stages per round
    for r in fed.replies:
        content = r["content"]
        assert all(len(record) == 0 for record in content.array_records.values())  # arrays travel masked only
        secagg = content.config_records["secaggplus_configs"]
        assert set(secagg) <= MASKED_STAGE_KEYS and set(secagg)
    for r in fits:  # the fit reply: status, num_examples = 1, and the (clear) metrics
        metrics = dict(r["content"].config_records["fitres.metrics"])
        assert metrics["num-examples"] == 1 and r["content"]["fitres.num_examples"]["num_examples"] == 1
        assert metrics["loss"] == 0.6931  # secagg alone hides updates, not metrics (the statement says so)
    doc = json.loads((tmp_path / "federated.json").read_text())
    assert all(b["up"] > 0 and b["down"] > 0 for r in doc["rounds"] for b in r["bytes"].values())


def test_central_dp_noises_the_secure_mean_and_accounts_it(tmp_path):
    z = 2.0
    doc, fed = _run(tmp_path, dp="user", **{"dp-noise-multiplier": z})
    assert [r["epsilon"] for r in doc["rounds"]] == pytest.approx([epsilon_after(z, 1e-5, k) for k in (1, 2, 3, 4)])
    released = _results(tmp_path, fed)[1]["reranker/base/w"]
    noise = released - _plain_mean(fed, 1)["reranker/base/w"]
    assert noise.std() == pytest.approx(z * 1.0 / len(NODES), rel=0.03)
    for r in fed.replies:  # DP mode: only cost metrics in the clear
        if r["round"]:
            assert set(r["content"].config_records["fitres.metrics"]) == {"num-examples", "llm-calls", "tokens",
                                                                          "cache-hits", "seconds"}
    assert "the SecAgg+ mean" in doc["privacy"]["mechanism"]


def test_a_dropout_under_secagg_and_dp_releases_nothing(tmp_path):
    doc, fed = _run(tmp_path, drop={2: 13}, dp="user", **{"dp-noise-multiplier": 2.0})
    assert doc["status"] == "done"
    skipped = doc["rounds"][1]
    assert skipped["released"] is False and "2 of 3" in skipped["note"]
    assert [r["epsilon"] for r in doc["rounds"]] == pytest.approx(
        [epsilon_after(2.0, 1e-5, k) for k in (1, 1, 2, 3)])
    np.testing.assert_array_equal(_results(tmp_path, fed)[2]["reranker/base/w"],
                                  _results(tmp_path, fed)[1]["reranker/base/w"])
