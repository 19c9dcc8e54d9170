"""Federation with the real apps, encoder and embedded LLM on Flower's simulation runtime, driven by Flower's
own CLI (a local simulation SuperLink + `flwr run`): results beside the baselines, rounds of one module at a
time with down = up, nothing private in any reply, and a stopped-then-resumed run ending where an
uninterrupted one does."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedhydra.client.state import ClientState
from fedhydra.common import settings
from fedhydra.common.config import get_config
from fedhydra.common.hydra import HydraModels, shared_arrays
from fedhydra.common.partition import load_users
from fedhydra.simulations.simulate import simulate_command

from conftest import LLM_UNAVAILABLE

pytestmark = [pytest.mark.llm, pytest.mark.skipif(bool(LLM_UNAVAILABLE), reason=f"embedded LLM: {LLM_UNAVAILABLE}")]

# A ClientApp module shipped inside the test's app folder (the FAB): FedHydra's own app plus a mod that writes
# every reply the client sends (all records, all values) to FOLDER. Flower loads it in the simulation's actors.
RECORDER = '''
import json, os
from pathlib import Path
from fedhydra.client.client_app import build_app

FOLDER = Path({folder!r})


def record(msg, context, call_next):
    reply = call_next(msg, context)
    doc = {{"type": msg.metadata.message_type, "arrays": {{}}, "metrics": {{}}, "configs": {{}}}}
    for name, record in reply.content.items():
        kind = type(record).__name__
        if kind == "ArrayRecord":
            doc["arrays"][name] = {{k: list(a.shape) for k, a in record.items()}}
        elif kind == "MetricRecord":
            doc["metrics"][name] = dict(record.items())
        else:
            doc["configs"][name] = {{k: v if isinstance(v, (int, float, str, bool)) else repr(v)
                                    for k, v in record.items()}}
    FOLDER.mkdir(parents=True, exist_ok=True)
    (FOLDER / (msg.metadata.message_type + "-" + msg.metadata.message_id + ".json")).write_text(json.dumps(doc))
    return reply


app = build_app(mods=[record])
'''
TINY = {"task": "LaMP_2M", "clients": 3, "test-clients": 1, "rounds": 2, "pseudo-queries": 1, "retrieve": 2,
        "k": 1, "candidates": 2, "train-layers": 1, "adapter-label-queries": 2, "epochs": 1, "seed": 0}


def _simulate(out: Path, cache: Path, methods: str = "hydra-fed", record: Path | None = None, **extra) -> Path:
    """`fedhydra simulate` on 3 train clients + 1 test client (synthetic users), tiny sizes, 2 rounds per module."""
    args = argparse.Namespace(methods=methods, parallel=2, out=str(out))
    values = settings.resolve(TINY, {"cache-dir": str(cache)}, extra)
    kw = {"clientapp": "recorder:app", "files": {"recorder.py": RECORDER.format(folder=str(record))}} if record else {}
    return simulate_command(args, values, **kw)


def _federated(out: Path) -> dict:
    return json.loads((out / "federated" / "federated.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("fed-a")
    cache = tmp_path_factory.getbasetemp() / "fed-llm-cache"
    _simulate(out, cache, methods="zero-shot,hydra-local,hydra-fed", record=out / "replies")
    return out, cache


def _users():
    return load_users(settings.resolve(TINY)).users


def test_simulate_writes_results_beside_the_baselines(uninterrupted):
    out, _ = uninterrupted
    doc = _federated(out)
    assert doc["status"] == "done"
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["zero-shot", "hydra-local", "hydra-fed"]
    fed = results["methods"]["hydra-fed"]
    assert fed["users"] == 1 and fed["metrics"] == doc["evaluation"]["metrics"]
    assert (out / "rounds-loss.png").stat().st_size > 1000 and (out / "rounds-bytes.png").stat().st_size > 1000
    assert "hydra-fed" in (out / "results.md").read_text()
    assert doc["settings"]["strategy"] == "fedavg" and "margin" in doc


def test_rounds_carry_one_module_down_and_up(uninterrupted):
    doc = _federated(uninterrupted[0])
    assert [r["module"] for r in doc["rounds"]] == ["reranker", "reranker", "adapter", "adapter"]
    assert all(r["clients"] == 3 for r in doc["rounds"])
    ev = doc["evaluation"]
    assert ev["users"] == 1 and ev["clients"] == 1
    assert 0.0 <= ev["metrics"]["accuracy"] <= 1.0
    # a train message carries exactly the module it trains: down equals up, one module's shared part
    full = 2 * sum(p.numel() * 4 for p in HydraModels.new(get_config("cpu")).reranker.encoder.parameters())
    for r in doc["rounds"]:
        for b in r["bytes"].values():
            assert 0 < b["up"] <= 0.2 * full and b["down"] == b["up"]


def test_nothing_private_leaves_a_client(uninterrupted):
    root, _ = uninterrupted
    allowed = set(shared_arrays(HydraModels.new(get_config("cpu", train_layers=1))))
    users = _users()
    private_texts = []
    for user in users:
        private_texts += [user.input, user.gold] + [v for item in user.profile for k, v in item.items() if k != "id"]
    replies = [json.loads(p.read_text()) for p in sorted((root / "replies").glob("*.json"))]
    kinds = {r["type"] for r in replies}
    assert kinds == {"query.describe", "query.install", "train", "evaluate.calibrate", "evaluate"}, kinds
    for r in replies:
        for record in r["arrays"].values():
            assert set(record) <= allowed, sorted(set(record) - allowed)[:3]  # shared parameters only
            assert not any("/head/" in k for k in record)
        for record in r["metrics"].values():
            for k, v in record.items():
                assert isinstance(v, (int, float)), (k, v)  # numbers only: no text, no per-user lists
        for record in r["configs"].values():
            assert set(record) == {"task"}  # the describe reply names the task, nothing else
        keys = json.dumps([list(rec) for part in ("arrays", "metrics", "configs") for rec in r[part].values()])
        assert not [u.id for u in users if u.id in keys]  # no user id in any key (ids may be digits)
        dump = json.dumps(r)
        # texts with a letter: a digits-only id like "1000" also occurs inside float metric values
        assert not [t for t in private_texts if len(t) > 3 and any(c.isalpha() for c in t) and t in dump]
    assert all(r["arrays"] for r in replies if r["type"] == "train")
    assert all(not r["arrays"] for r in replies if r["type"] != "train")


def test_resume_after_stop_ends_where_an_uninterrupted_run_does(tmp_path, uninterrupted):
    root_a, cache = uninterrupted
    doc_a = _federated(root_a)
    _simulate(tmp_path, cache, **{"stop-after-round": 1})
    stopped = _federated(tmp_path)
    assert stopped["status"] == "stopped after round 1" and len(stopped["rounds"]) == 1
    assert json.loads((tmp_path / "federated" / "checkpoint" / "progress.json").read_text())["round"] == 1
    with pytest.raises(ValueError, match="other settings"):  # a resume under other settings is refused
        _simulate(tmp_path, cache, resume=True, rounds=3)
    _simulate(tmp_path, cache, resume=True)
    resumed = _federated(tmp_path)
    assert resumed["status"] == "done"
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4]
    a = load_file(str(root_a / "federated" / "checkpoint" / "round-4.safetensors"))
    b = load_file(str(tmp_path / "federated" / "checkpoint" / "round-4.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert resumed["evaluation"]["metrics"] == pytest.approx(doc_a["evaluation"]["metrics"])
    # the clients' heads survived the restart and match the uninterrupted run's
    for folder in sorted((tmp_path / "clients").iterdir()):
        state_b, state_a = ClientState(folder), ClientState(root_a / "clients" / folder.name)
        mb, ma = state_b.load_models(), state_a.load_models()
        for uid in state_b.user_ids():
            assert mb.reranker.has_user(uid) and mb.adapter.has_user(uid)
            for k, v in mb.adapter.personal_state(uid).items():
                torch.testing.assert_close(v, ma.adapter.personal_state(uid)[k], rtol=1e-5, atol=1e-6)
