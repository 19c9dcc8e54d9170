"""Federation on Flower's simulation runtime with the real apps, encoder and embedded LLM:
nothing private leaves a client, and a stopped-then-resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedhydra.client.state import ClientState
from fedhydra.common.config import get_config
from fedhydra.common.hydra import HydraModels, shared_arrays
from fedhydra.common.synthetic import make_synthetic
from fedhydra.simulations.partition import prepare_clients
from fedhydra.simulations.simulate import run_federated

from conftest import LLM_UNAVAILABLE

pytestmark = [pytest.mark.llm, pytest.mark.skipif(bool(LLM_UNAVAILABLE), reason=f"embedded LLM: {LLM_UNAVAILABLE}")]

SIZES = {"rounds": 2, "local-epochs": 1, "pseudo-queries": 1, "retrieve": 2, "k": 1, "candidates": 2, "train-layers": 1,
         "min-nodes": 1, "preset": "cpu",
         "seed": 0, "llm": "embedded", "llm-base-url": "", "llm-model": "", "resume": False, "stop-after-round": 0}


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
def split(tmp_path_factory):
    users = make_synthetic("LaMP_2M", n_users=5, seed=3).users
    return users[:3], users[3:4]  # 3 train clients, 1 test client (one user each)


def _run(root: Path, split, cache: Path, recorder: str | None = None, **overrides) -> dict:
    from fedhydra.client import client_app

    train_users, test_users = split
    specs = prepare_clients(root / "clients", make_synthetic("LaMP_2M", n_users=1).task, train_users, test_users)
    settings = {**SIZES, "task": "LaMP_2M", "clients-per-round": 0, "out": str(root / "federated"),
                "state-root": str((root / "clients").resolve()), "llm-shared-cache": str(cache), **overrides}
    if recorder:  # the simulation builds its ClientApp through make_client_app: add the recorder there
        original = client_app.make_client_app
        client_app.make_client_app = lambda defaults, mods=None: original(defaults, mods=[record_replies(recorder)])
        try:
            return run_federated(specs, settings, parallel=2)
        finally:
            client_app.make_client_app = original
    return run_federated(specs, settings, parallel=2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, split):
    root = tmp_path_factory.mktemp("fed-a")
    cache = tmp_path_factory.getbasetemp() / "fed-llm-cache"
    doc = _run(root, split, cache, recorder=str(root / "replies"))
    return root, cache, doc


def test_federated_run_completes_and_reports(uninterrupted, split):
    root, _, doc = uninterrupted
    assert doc["status"] == "done"
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


def test_nothing_private_leaves_a_client(uninterrupted, split):
    root, _, _ = uninterrupted
    allowed = set(shared_arrays(HydraModels.new(get_config("cpu"))))
    private_texts = []
    for user in split[0] + split[1]:
        private_texts += [user.input, user.gold] + [v for item in user.profile for k, v in item.items() if k != "id"]
        private_texts.append(user.id)
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
        dump = json.dumps(r)
        assert not [t for t in private_texts if t and len(t) > 3 and t in dump]
    train = [r for r in replies if r["type"] == "train"]
    assert train and all(r["arrays"] for r in train)
    assert all(not r["arrays"] for r in replies if r["type"] == "evaluate")


def test_resume_after_stop_ends_where_an_uninterrupted_run_does(tmp_path, uninterrupted, split):
    root_a, cache, doc_a = uninterrupted
    stopped = _run(tmp_path, split, cache, **{"stop-after-round": 1})
    assert stopped["status"] == "stopped after round 1" and len(stopped["rounds"]) == 1
    assert json.loads((tmp_path / "federated" / "checkpoint" / "progress.json").read_text())["round"] == 1
    resumed = _run(tmp_path, split, cache, resume=True)
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
