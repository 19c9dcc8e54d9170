"""Federation with the real apps, encoder and embedded LLM on Flower's simulation runtime, driven by Flower's
own CLI (a local simulation SuperLink + `flwr run`): results beside the baselines, rounds of one module at a
time with down = up, nothing private in any reply, and a stopped-then-resumed run ending where an
uninterrupted one does; a user-level DP run and a SecAgg+ run (1 round per module each) clip, account, aggregate
the plain mean and send nothing private."""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedhydra.client.state import ClientState
from fedhydra.client.train_mods import PUBLIC_TRAIN_METRICS
from fedhydra.common import protocol, settings
from fedhydra.common.config import get_config
from fedhydra.common.hydra import HydraModels, shared_arrays
from fedhydra.common.metrics import evaluate
from fedhydra.common.partition import load_users
from fedhydra.common.tasks import get_task
from fedhydra.server.central_dp import epsilon_after
from fedhydra.server.secagg import QUANTIZATION_RANGE
from fedhydra.simulations.simulate import simulate_command

from conftest import LLM_UNAVAILABLE

pytestmark = [pytest.mark.llm, pytest.mark.skipif(bool(LLM_UNAVAILABLE), reason=f"embedded LLM: {LLM_UNAVAILABLE}")]

# A ClientApp module shipped inside the test's app folder (the FAB): FedHydra's own app plus a mod that writes
# every reply the client sends (all records, all values) to FOLDER. Flower loads it in the simulation's actors.
RECORDER = '''
import json, os
from pathlib import Path

import numpy as np

from fedhydra.client.client_app import build_app
from fedhydra.common.protocol import TrainRequest

FOLDER = Path({folder!r})
INNER = {inner!r}


def _norm(back, sent):
    return float(np.sqrt(sum(float(((back[k].numpy().astype(np.float64) - sent[k].numpy()) ** 2).sum())
                             for k in sent)))


def _summary(value):
    """Scalars as they are; bytes (SecAgg+'s keys, encrypted shares, masked vectors) by size; the rest by repr."""
    if isinstance(value, (int, float, str, bool)):
        return value
    if isinstance(value, bytes) or (isinstance(value, list) and value and all(isinstance(v, bytes) for v in value)):
        return "<bytes: " + str(len(value) if isinstance(value, bytes) else [len(v) for v in value]) + ">"
    return repr(value)


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
            doc["configs"][name] = {{k: _summary(v) for k, v in record.items()}}
    sent, back = msg.content.array_records.get("arrays"), reply.content.array_records.get("arrays")
    if sent is not None and back is not None and list(sent.keys()) == list(back.keys()):
        doc["update_norm"] = _norm(back, sent)  # what the reply moves the arrays it got by
    FOLDER.mkdir(parents=True, exist_ok=True)
    (FOLDER / (msg.metadata.message_type + "-" + msg.metadata.message_id + ".json")).write_text(json.dumps(doc))
    return reply


def record_inner(msg, context, call_next):
    """Inside the privacy mods (before SecAgg+ masks it): the arrays a client got and the clipped ones it returns."""
    reply = call_next(msg, context)
    if INNER:
        folder = FOLDER / "inner"
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {{"sent|" + k.replace("/", "|"): a.numpy() for k, a in msg.content["arrays"].items()}}
        arrays |= {{"returned|" + k.replace("/", "|"): a.numpy() for k, a in reply.content["arrays"].items()}}
        server_round = TrainRequest.unpack(msg, int(context.run_config["rounds"])).server_round
        np.savez(folder / f"{{server_round}}-{{context.node_id}}.npz", **arrays)
    return reply


app = build_app(mods=[record], inner_train_mods=[record_inner])
'''
SECAGG_CONFIGS = {"secaggplus_configs": {"pk1", "pk2", "dsts", "ctxts", "masked_params", "nids", "shares"},
                  "fitres.status": {"code", "message"},
                  "fitres.metrics": set(PUBLIC_TRAIN_METRICS) | {"loss", "accuracy", "users"}}
DP_Z, DP_CLIP = 1.0, 0.05
TINY = {"task": "LaMP_2M", "clients": 3, "test-clients": 1, "rounds": 2, "pseudo-queries": 1, "retrieve": 2,
        "k": 1, "candidates": 2, "train-layers": 1, "adapter-label-queries": 2, "epochs": 1, "seed": 0}


def _simulate(out: Path, cache: Path, methods: str = "hydra-fed", record: Path | None = None, inner: bool = False,
              **extra) -> Path:
    """`fedhydra simulate` on 3 train clients + 1 test client (synthetic users), tiny sizes, 2 rounds per module."""
    args = argparse.Namespace(methods=methods, parallel=2, out=str(out))
    values = settings.resolve(TINY, {"cache-dir": str(cache)}, extra)
    kw = {"clientapp": "recorder:app", "files": {"recorder.py": RECORDER.format(folder=str(record), inner=inner)}} \
        if record else {}
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
    assert "- lr schedule: round" in (out / "results.md").read_text()
    # the test client's answers stayed in its own folder; the harness read them there for a paired interval,
    # and they give the metric the sums gave the server
    zero = [json.loads(line) for line in (out / "predictions" / "zero-shot.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (out / "predictions" / "hydra-fed.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in zero] == ClientState(out / "clients" / "client-3").user_ids()
    assert evaluate(get_task("LaMP_2M"), [r["prediction"] for r in rows], [r["gold"] for r in rows]) == \
        pytest.approx(doc["evaluation"]["metrics"])
    assert "low" in fed["ratio"] and "only sums leave clients" not in (out / "results.md").read_text()  # a paired one
    assert doc["settings"]["strategy"] == "fedavg" and "margin" in doc


def test_rounds_carry_one_module_down_and_up(uninterrupted):
    doc = _federated(uninterrupted[0])
    assert [r["module"] for r in doc["rounds"]] == ["reranker", "reranker", "adapter", "adapter"]
    assert all(r["clients"] == 3 for r in doc["rounds"])
    ev = doc["evaluation"]
    assert ev["users"] == 1 and ev["clients"] == 1
    assert ev["metrics"]["accuracy"] == _answer_from_state(uninterrupted[0] / "clients" / "client-3")
    # a train message carries exactly the module it trains: down equals up, one module's shared part
    full = 2 * sum(p.numel() * 4 for p in HydraModels.new(get_config("cpu")).reranker.encoder.parameters())
    for r in doc["rounds"]:
        for b in r["bytes"].values():
            assert 0 < b["up"] <= 0.2 * full and b["down"] == b["up"]


def _answer_from_state(folder: Path) -> float:
    """The accuracy of the unseen user's answer, recomputed from what its client kept (fitted heads, margin, the
    LLM answers in its own cache): what the server was told must be what the client's state answers."""
    from fedhydra.client import trainer
    from fedhydra.common.metrics import evaluate
    from fedhydra.common.pipeline import HydraPipeline
    from fedhydra.common.retrieval import Retriever

    state = ClientState(folder)
    cfg, models = state.config(), state.load_models()
    margin = None if cfg.margin == "off" else cfg.margin
    llm = trainer.client_llm(state, settings.resolve(TINY))
    [user] = state.users("test")
    pipe = HydraPipeline(state.task, llm, Retriever(state.task), models.reranker, models.adapter, cfg, margin)
    calls = llm.stats.calls
    answer = pipe.answer(user, protocol.FULL).text
    assert llm.stats.calls == calls, "the answer is recomputed from the client's cached LLM replies"
    return evaluate(state.task, [answer], [user.gold])["accuracy"]


@functools.cache
def _shared_names() -> frozenset[str]:
    return frozenset(shared_arrays(HydraModels.new(get_config("cpu", train_layers=1))))


def _assert_nothing_private(root: Path, secagg: bool = False, dp: bool = False) -> list[dict]:
    """Every reply the clients sent (recorded as it left): shared arrays, numbers, and under SecAgg+ only
    masked arrays and the protocol's keys; no user id or private text anywhere."""
    allowed = _shared_names()
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
        for name, record in r["configs"].items():
            if secagg and r["type"] == "train":  # SecAgg+'s keys, shares and masked vectors; the fit status
                assert name in SECAGG_CONFIGS and set(record) <= SECAGG_CONFIGS[name], (name, sorted(record))
                if name == "fitres.metrics":
                    assert all(isinstance(v, (int, float)) for v in record.values())
            else:
                assert set(record) == {"task"}  # the describe reply names the task, nothing else
        keys = json.dumps([list(rec) for part in ("arrays", "metrics", "configs") for rec in r[part].values()])
        assert not [u.id for u in users if u.id in keys]  # no user id in any key (ids may be digits)
        dump = json.dumps(r)
        # texts with a letter: a digits-only id like "1000" also occurs inside float metric values
        assert not [t for t in private_texts if len(t) > 3 and any(c.isalpha() for c in t) and t in dump]
    train = [r for r in replies if r["type"] == "train"]
    if secagg:  # arrays leave only masked, inside the protocol's config record
        assert all(not any(r["arrays"].values()) for r in train)
    else:
        assert all(r["arrays"] for r in train)
    assert all(not r["arrays"] for r in replies if r["type"] != "train")
    if dp:  # per-client statistics of the data are dropped; equal weights
        for r in train:
            metrics = r["metrics"].get("metrics") or r["configs"].get("fitres.metrics", {})
            assert set(metrics) <= set(PUBLIC_TRAIN_METRICS) and metrics["num-examples"] == 1, metrics
    return replies


def test_nothing_private_leaves_a_client(uninterrupted):
    _assert_nothing_private(uninterrupted[0])


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    """User-level central DP on the Message-API path: 1 round per module."""
    out = tmp_path_factory.mktemp("fed-dp")
    _simulate(out, tmp_path_factory.getbasetemp() / "fed-llm-cache", record=out / "replies", rounds=1, dp="user",
              **{"dp-noise-multiplier": DP_Z, "dp-clip": DP_CLIP})
    return out


def test_a_user_level_dp_run_clips_every_update_accounts_and_sends_nothing_private(dp_run):
    doc = _federated(dp_run)
    assert doc["status"] == "done" and [r["clients"] for r in doc["rounds"]] == [3, 3]
    assert [r["epsilon"] for r in doc["rounds"]] == pytest.approx([epsilon_after(DP_Z, 1e-5, k) for k in (1, 2)])
    assert doc["privacy"]["epsilon"] == doc["rounds"][-1]["epsilon"] and doc["privacy"]["noise_multiplier"] == DP_Z
    assert all(r["loss"] is None for r in doc["rounds"])  # no per-client loss left the clients
    md = (dp_run / "results.md").read_text()
    assert "## Privacy" in md and f"| 2 | {doc['privacy']['epsilon']:.4f} |" in md and "not covered" in md
    replies = _assert_nothing_private(dp_run, dp=True)
    train = [r for r in replies if r["type"] == "train"]
    assert len(train) == 2 * 3 and all(r["update_norm"] <= DP_CLIP * (1 + 1e-5) for r in train)


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory):
    """SecAgg+ on the train rounds, no DP: 1 round per module, every client's input to the protocol recorded."""
    out = tmp_path_factory.mktemp("fed-secagg")
    _simulate(out, tmp_path_factory.getbasetemp() / "fed-llm-cache", record=out / "replies", inner=True, rounds=1,
              secagg=True)
    return out


def test_secagg_aggregates_the_plain_mean_within_quantization_and_sends_only_masked_arrays(secagg_run):
    doc = _federated(secagg_run)
    assert doc["status"] == "done" and [r["clients"] for r in doc["rounds"]] == [3, 3]
    final = load_file(str(secagg_run / "federated" / "checkpoint" / "round-2.safetensors"))
    step = 2 * 1.0 / QUANTIZATION_RANGE  # clipping_range = dp-clip = 1.0
    for server_round in (1, 2):
        files = sorted((secagg_run / "replies" / "inner").glob(f"{server_round}-*.npz"))
        assert len(files) == 3
        inputs = [dict(np.load(f)) for f in files]
        names = [k[len("sent|"):] for k in inputs[0] if k.startswith("sent|")]
        for name in names:
            sent = inputs[0]["sent|" + name]
            deltas = [x["returned|" + name] - x["sent|" + name] for x in inputs]
            expected = sent + np.mean(np.stack(deltas).astype(np.float64), axis=0)
            np.testing.assert_allclose(final[name.replace("|", "/")].numpy(), expected, rtol=0, atol=step + 1e-7)
    assert "## Privacy" in (secagg_run / "results.md").read_text()
    assert doc["privacy"]["secure_aggregation"] is True
    _assert_nothing_private(secagg_run, secagg=True)


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
    # the clients' heads survived the restart and match the uninterrupted run's (a test user whose history ranks
    # too few queries has none, in both runs: fit-min-queries)
    heads = 0
    for folder in sorted((tmp_path / "clients").iterdir()):
        state_b, state_a = ClientState(folder), ClientState(root_a / "clients" / folder.name)
        mb, ma = state_b.load_models(), state_a.load_models()
        for uid in state_b.user_ids():
            assert mb.reranker.has_user(uid) == ma.reranker.has_user(uid)
            assert mb.adapter.has_user(uid) == ma.adapter.has_user(uid)
            heads += mb.adapter.has_user(uid)
            for k, v in (mb.adapter.personal_state(uid) if mb.adapter.has_user(uid) else {}).items():
                torch.testing.assert_close(v, ma.adapter.personal_state(uid)[k], rtol=1e-5, atol=1e-6)
    assert heads, "no user kept an adapter head across the restart"
