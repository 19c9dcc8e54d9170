"""dp=record on a real Flower simulation (Flower's CLI, the real apps, the embedded LLM): every train reply
carries the record-level privacy statement as numbers, epsilon accumulates per client across the reranker's and
the adapter's rounds as each client's ledger says, and nothing private leaves a client."""

from __future__ import annotations

import json

import pytest

from fedhydra.client.privacy_ledger import PrivacyLedger
from fedhydra.client.state import ClientState

from conftest import LLM_UNAVAILABLE
from test_federation import _federated, _simulate, _users

pytestmark = [pytest.mark.llm, pytest.mark.skipif(bool(LLM_UNAVAILABLE), reason=f"embedded LLM: {LLM_UNAVAILABLE}")]

DP = {"dp": "record", "dp-epsilon": 8.0, "dp-delta": 1e-5, "dp-clip": 1.0}
DP_METRICS = {"dp-exhausted", "dp-epsilon-spent", "dp-item-epsilon", "dp-item-units", "dp-delta",
              "dp-noise-multiplier", "dp-clip", "dp-sample-rate", "dp-steps", "dp-total-steps", "dp-units"}


def test_record_dp_federation_accounts_every_round_and_leaks_nothing(tmp_path_factory):
    out = tmp_path_factory.mktemp("fed-dp")
    cache = tmp_path_factory.getbasetemp() / "fed-llm-cache"  # shared with test_federation.py when both run
    _simulate(out, cache, record=out / "replies", **DP)
    doc = _federated(out)
    assert doc["status"] == "done" and [r["module"] for r in doc["rounds"]] == ["reranker"] * 2 + ["adapter"] * 2

    train = [json.loads(p.read_text()) for p in sorted((out / "replies").glob("train-*.json"))]
    assert len(train) == 3 * 4  # 3 clients x 4 rounds
    by_plan: dict[float, list[dict]] = {}
    for reply in train:
        (metrics,) = reply["metrics"].values()
        assert DP_METRICS <= set(metrics) and all(isinstance(v, (int, float)) for v in metrics.values())
        assert metrics["dp-exhausted"] == 0 and metrics["dp-epsilon-spent"] <= 8.0
        by_plan.setdefault(metrics["dp-noise-multiplier"], []).append(metrics)
    private = [t for u in _users() for item in u.profile for k, t in item.items() if k != "id"]
    dump = json.dumps(train)
    assert not [t for t in private if len(t) > 3 and any(c.isalpha() for c in t) and t in dump]

    ledgers = 0
    for folder in sorted((out / "clients").iterdir()):
        state = ClientState(folder)
        if not state.user_ids("train"):
            assert not state.privacy_ledger_path.exists()  # the fit stage of unseen users spends nothing
            continue
        ledgers += 1
        ledger = PrivacyLedger.load(state.privacy_ledger_path)
        assert [r.module for r in ledger.rounds] == ["reranker"] * 2 + ["adapter"] * 2
        eps = [r.epsilon for r in ledger.rounds]
        assert eps == sorted(eps) and len(set(eps)) == 4
        assert 8.0 - 0.02 <= eps[-1] <= 8.0  # the planned rounds spend the target, never more
        assert ledger.total_steps == 4 * ledger.plan.steps_per_round
    assert ledgers == 3
