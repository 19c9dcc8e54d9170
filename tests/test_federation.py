"""Federation on Flower's simulation runtime with the real apps, encoder and embedded LLM:
nothing private leaves a client, and a stopped-then-resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedhydra.client.state import ClientState
from fedhydra.common.config import get_config
from fedhydra.common.hydra import HydraModels, shared_arrays
from fedhydra.common.data import load_split
from fedhydra.common.synthetic import write_synthetic
from fedhydra.simulations.simulate import simulate_command

from conftest import LLM_UNAVAILABLE

pytestmark = [pytest.mark.llm, pytest.mark.skipif(bool(LLM_UNAVAILABLE), reason=f"embedded LLM: {LLM_UNAVAILABLE}")]


def record_replies(folder: str):
    """A Flower mod that writes every reply the client sends (all records, all values) to `folder`."""
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray actors cannot import tests/

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        doc = {"type": msg.metadata.message_type, "arrays": {}, "metrics": {}, "configs": {}}
        for name, record in reply.content.items():
            kind = type(record).__name__
            if kind == "ArrayRecord":
                doc["arrays"][name] = {k: list(a.shape) for k, a in record.items()}
            elif kind == "MetricRecord":
                doc["metrics"][name] = {k: v for k, v in record.items()}
            else:
                doc["configs"][name] = {k: v if isinstance(v, (int, float, str, bool)) else repr(v)
                                        for k, v in record.items()}
        os.makedirs(folder, exist_ok=True)
        path = Path(folder) / f"{msg.metadata.message_type}-{msg.metadata.message_id}.json"
        path.write_text(json.dumps(doc))
        return reply

    return mod


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fed-data")
    write_synthetic(folder, task="LaMP_2M", n_users=4, seed=3)
    return folder


def _simulate(data: Path, out: Path, cache: Path, recorder: str | None = None, methods: str = "hydra-fed",
              **flags) -> Path:
    """`fedhydra simulate` on 3 train clients + 1 test client, tiny sizes, 2 rounds per module."""
    from fedhydra.client import client_app

    args = argparse.Namespace(
        task="LaMP_2M", data=str(data), clients=3, test_clients=1, users_per_client=1, partitioner="id", rounds=2,
        local_epochs=1, clients_per_round=0, methods=methods, preset="cpu", pseudo_queries=1, retrieve=2, k=1,
        candidates=2, train_layers=1, seed=0, parallel=2, out=str(out), resume=False, stop_after_round=0,
        llm="embedded", llm_base_url=None, llm_model=None, llm_threads=1, llm_api_key_env="OPENAI_API_KEY",
        cache_dir=str(cache))
    for k, v in flags.items():
        setattr(args, k, v)
    original = client_app.make_client_app
    if recorder:  # the harness builds its ClientApp through make_client_app: add the recorder mod there
        client_app.make_client_app = lambda defaults, mods=None: original(defaults, mods=[record_replies(recorder)])
    try:
        return simulate_command(args)
    finally:
        client_app.make_client_app = original


def _federated(out: Path) -> dict:
    return json.loads((out / "federated" / "federated.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("fed-a")
    cache = tmp_path_factory.getbasetemp() / "fed-llm-cache"
    _simulate(data, out, cache, recorder=str(out / "replies"), methods="zero-shot,hydra-local,hydra-fed")
    return out, cache


def _users(data: Path):
    return load_split(data).users


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


def test_rounds_train_the_reranker_then_the_adapter_within_the_upload_budget(uninterrupted):
    doc = _federated(uninterrupted[0])
    assert [r["module"] for r in doc["rounds"]] == ["reranker", "reranker", "adapter", "adapter"]
    assert all(r["clients"] == 3 for r in doc["rounds"])
    ev = doc["evaluation"]
    assert ev["users"] == 1 and ev["clients"] == 1
    assert 0.0 <= ev["metrics"]["accuracy"] <= 1.0
    # upload per client per round: one module's shared part, well under 20% of both full MiniLMs
    full = 2 * sum(p.numel() * 4 for p in HydraModels.new(get_config("cpu")).reranker.encoder.parameters())
    for r in doc["rounds"]:
        for b in r["bytes"].values():
            assert 0 < b["up"] <= 0.2 * full
            assert b["down"] > b["up"]  # both modules go down, one comes back


def test_nothing_private_leaves_a_client(uninterrupted, data):
    root, _ = uninterrupted
    allowed = set(shared_arrays(HydraModels.new(get_config("cpu"))))
    private_texts = []
    for user in _users(data):
        private_texts += [user.input, user.gold] + [v for item in user.profile for k, v in item.items() if k != "id"]
    replies = [json.loads(p.read_text()) for p in sorted((root / "replies").glob("*.json"))]
    kinds = {r["type"] for r in replies}
    assert {"train", "evaluate", "query"} <= kinds, kinds
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
        assert not [u.id for u in _users(data) if u.id in keys]  # no user id in any key (ids may be digits)
        dump = json.dumps(r)
        # texts with a letter: a digits-only id like "1000" also occurs inside float metric values
        assert not [t for t in private_texts if len(t) > 3 and any(c.isalpha() for c in t) and t in dump]
    train = [r for r in replies if r["type"] == "train"]
    assert train and all(r["arrays"] for r in train)
    assert all(not r["arrays"] for r in replies if r["type"] == "evaluate")


def test_resume_after_stop_ends_where_an_uninterrupted_run_does(tmp_path, uninterrupted, data):
    root_a, cache = uninterrupted
    doc_a = _federated(root_a)
    _simulate(data, tmp_path, cache, stop_after_round=1)
    stopped = _federated(tmp_path)
    assert stopped["status"] == "stopped after round 1" and len(stopped["rounds"]) == 1
    assert json.loads((tmp_path / "federated" / "checkpoint" / "progress.json").read_text())["round"] == 1
    _simulate(data, tmp_path, cache, resume=True)
    resumed = _federated(tmp_path)
    assert resumed["status"] == "done"
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4]
    a = load_file(str(root_a / "federated" / "checkpoint" / "shared-round-4.safetensors"))
    b = load_file(str(tmp_path / "federated" / "checkpoint" / "shared-round-4.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert resumed["evaluation"]["metrics"] == pytest.approx(doc_a["evaluation"]["metrics"])
    # the clients' heads survived the restart and match the uninterrupted run's
    for spec_dir in sorted((tmp_path / "clients").iterdir()):
        state_b, state_a = ClientState(spec_dir), ClientState(root_a / "clients" / spec_dir.name)
        mb, ma = state_b.load_models(), state_a.load_models()
        for uid in state_b.user_ids():
            assert mb.reranker.has_user(uid) and mb.adapter.has_user(uid)
            for k, v in mb.adapter.personal_state(uid).items():
                torch.testing.assert_close(v, ma.adapter.personal_state(uid)[k], rtol=1e-5, atol=1e-6)
