"""Record-level DP on the client (client/privacy.py, client/privacy_ledger.py): the unit is a pseudo-query,
each unit is clipped, epsilon accumulates across rounds and restarts exactly as Opacus's accountant says,
a spent budget stops training, and the noise does not follow the public seed.

Small real models (MiniLM, 64 tokens, one trainable layer) on synthetic examples; no LLM.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer

from fedhydra.client import privacy, trainer
from fedhydra.client.privacy import (grad_sample_hooks, item_units, privacy_units, train_record_dp,
                                     unit_grad_samples, units_loss)
from fedhydra.client.privacy_ledger import DPSettings, PrivacyError, PrivacyLedger, item_epsilon
from fedhydra.client.state import ClientState
from fedhydra.common import hydra, labels
from fedhydra.common.config import get_config
from fedhydra.common.examples import CandidateGroup, ScoredExample
from fedhydra.common.llm.base import LLMStats
from fedhydra.common.retrieval import Retriever
from fedhydra.common.scorer import HydraScorer
from fedhydra.common.synthetic import make_synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DELTA = 1e-5
# 2 users x 4 pseudo-queries x 3 rows; batch 6 rows = 2 units -> q = 1/4, 4 steps per epoch (and per round)
OPTIM = dict(epochs=1, lr=5e-5, head_lr=1e-3, batch_size=6, weight_decay=0.01)


def pointwise(users=("a", "b"), queries=4, rows=3) -> list[ScoredExample]:
    """Each pseudo-query q of user u: `rows` pairs, item j of the pair at (q + j) mod queries."""
    return [ScoredExample(u, f"{u} query {q} about topic {q}", f"text {j} on topic {(q + j) % queries}", int(j == 0),
                          [f"{u}{q}", f"{u}{(q + j) % queries}"])
            for u in users for q in range(queries) for j in range(rows)]


def listwise(users=("a", "b"), queries=3) -> list[CandidateGroup]:
    return [CandidateGroup(u, f"{u} asks {q}", [f"answer {c} for {q}" for c in range(3)], [1.0, 0.5, 0.0],
                           sources=[f"{u}{q}"]) for u in users for q in range(queries)]


def dp_settings(**kw) -> DPSettings:
    values = dict(mode="record", epsilon=8.0, noise_multiplier=0.0, clip=1.0, delta=DELTA, max_epsilon=0.0, rounds=2)
    return DPSettings(**(values | kw))


def new_model() -> HydraScorer:
    torch.manual_seed(0)  # every model starts alike, so only the DP randomness can tell two runs apart
    return HydraScorer(max_length=64, train_layers=1, device="cpu")


def run_round(model, ledger, dp, server_round, examples=None, **kw):
    """One DP round; `ledger` is a live PrivacyLedger, or a path to load it from (as a restarted client does)."""
    ledger = ledger if isinstance(ledger, PrivacyLedger) else PrivacyLedger.load(ledger)
    return train_record_dp(model, examples or pointwise(), ledger, dp, module="reranker",
                           server_round=server_round, **(OPTIM | kw))


# ---------------------------------------------------------------- the unit
def test_units_are_pseudo_queries_and_k_counts_the_units_an_item_enters():
    units = privacy_units(pointwise())
    assert len(units) == 8 and all(u.rows == 3 for u in units)
    assert {e.query for e in units[0].examples} == {units[0].query}
    # item a1 is query 1's own item and the pair item of queries 0 (j=1) and 3 (j=2): 3 units
    assert item_units(units) == 3
    held = listwise() + [CandidateGroup("a", "held", ["x", "y"], [1.0, 0.0], held_out=True, sources=["a9"])]
    assert len(privacy_units(held)) == 6 and item_units(privacy_units(held)) == 1
    unknown = [ScoredExample("a", f"q{i}", "t", 1) for i in range(5)]  # labels cached before sources existed
    assert item_units(privacy_units(unknown)) == 5  # any unit of the user may hold any item


@pytest.mark.parametrize("examples", [pointwise(), listwise()], ids=["pointwise", "listwise"])
@pytest.mark.parametrize("max_rows", [3, 64], ids=["a-unit-a-chunk", "one-chunk"])
def test_the_clipped_unit_gradient_is_the_gradient_of_one_pseudo_query(examples, max_rows):
    """Per-row grad samples summed per unit equal the gradient of that unit's loss alone (dropout off), whether
    the units run in one backward pass or in chunks."""
    model = new_model()
    for uid in ("a", "b"):
        model.add_user(uid, from_default=True)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    units = privacy_units(examples)
    batch = [units[0], units[1], units[-1]]  # two of user a, one of user b: masked head routing is exercised
    params = [p for m in (*model.top_layers, model.heads) for p in m.parameters()]
    model.train()
    direct, losses = [], []
    for unit in batch:
        loss, _, row_unit = units_loss(model, [unit])
        assert len(row_unit) == unit.rows > 1
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        direct.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
        losses.append(loss.item())
    hooks = grad_sample_hooks(model)
    try:
        loss_sum, _ = unit_grad_samples(model, batch, params, max_rows)
        assert loss_sum == pytest.approx(sum(losses), rel=1e-5)
        for p_index, p in enumerate(params):
            assert p.grad_sample.shape == (len(batch), *p.shape)
            for i in range(len(batch)):
                torch.testing.assert_close(p.grad_sample[i], direct[i][p_index], atol=1e-5, rtol=1e-4)
        head_b = {id(p) for p in model.head("b").parameters()}
        assert all(p.grad_sample[0].abs().sum() == 0 for p in params if id(p) in head_b)  # a's unit: no b gradient
    finally:
        hooks.cleanup()


# ---------------------------------------------------------------- accounting
@pytest.fixture(scope="module")
def full_run(tmp_path_factory, one_torch_thread):
    """Every planned round (rounds=2: 2 reranker + 2 adapter releases) of one uninterrupted client: one model
    and one ledger object in memory throughout."""
    path = tmp_path_factory.mktemp("uninterrupted") / "privacy.json"
    model, dp, ledger = new_model(), dp_settings(), PrivacyLedger.load(path)
    return path, [run_round(model, ledger, dp, r) for r in range(1, 5)]


def test_epsilon_grows_each_round_exactly_as_an_independent_opacus_accountant(full_run):
    path, reports = full_run
    rate, steps = 1 / 4, 4  # 8 units, 2 per expected batch
    z = get_noise_multiplier(target_epsilon=8.0, target_delta=DELTA, sample_rate=rate, steps=4 * steps,
                             accountant="rdp", epsilon_tolerance=0.01)
    eps = [r["epsilon"] for r in reports]
    assert eps == sorted(eps) and len(set(eps)) == 4
    for n, report in enumerate(reports, 1):
        assert report["plan"].noise_multiplier == z and report["plan"].sample_rate == rate
        independent = RDPAccountant()
        for _ in range(n * steps):
            independent.step(noise_multiplier=z, sample_rate=rate)
        assert report["epsilon"] == pytest.approx(independent.get_epsilon(DELTA), rel=1e-12)
        assert report["total_steps"] == n * steps
    assert 8.0 - 0.02 <= eps[-1] <= 8.0  # the plan spends the target over its rounds, never more
    items = [r["item_epsilon"] for r in reports]
    assert items == sorted(items) and all(i > e for i, e in zip(items, eps))  # K=3 > 1 unit
    ledger = PrivacyLedger.load(path)
    assert [tuple(h) for h in ledger.accountant.history] == [(z, rate, 16)]
    assert [r.epsilon for r in ledger.rounds] == eps


def test_item_epsilon_is_group_privacy_growing_with_k():
    events = lambda k: [(2.0, 0.25, 16, k)]  # noqa: E731
    unit = RDPAccountant()
    unit.history = [(2.0, 0.25, 16)]
    eps = [item_epsilon(events(k), DELTA) for k in (1, 2, 3)]
    assert unit.get_epsilon(DELTA) < eps[0] < eps[1] < eps[2]  # a changed item costs a removal and an addition
    assert item_epsilon([], DELTA) == 0.0


def test_stop_resume_finish_spends_exactly_what_an_uninterrupted_run_spends(full_run, tmp_path):
    _, uninterrupted = full_run
    path, dp = tmp_path / "privacy.json", dp_settings()
    first = [run_round(new_model(), path, dp, r) for r in (1, 2)]
    # a restarted client: new model and ledger objects, only the state folder carries over
    resumed = [run_round(new_model(), path, dp, r) for r in (3, 4)]
    assert resumed[0]["epsilon"] > first[-1]["epsilon"] and resumed[-1]["total_steps"] == 16
    assert [r["epsilon"] for r in first + resumed] == [r["epsilon"] for r in uninterrupted]
    assert resumed[-1]["item_epsilon"] == uninterrupted[-1]["item_epsilon"]


def test_a_ledger_refuses_other_settings_and_record_mode_needs_a_noise_level(tmp_path):
    with pytest.raises(PrivacyError, match="dp-epsilon > 0 .* or dp-noise-multiplier"):
        dp_settings(epsilon=0.0)
    with pytest.raises(PrivacyError, match="dp-clip"):
        dp_settings(clip=0.0)
    path = tmp_path / "privacy.json"
    run_round(new_model(), path, dp_settings(rounds=1), 1)
    before = path.read_bytes()
    with pytest.raises(PrivacyError, match=r"planned under other settings \(dp-epsilon 8.0 -> 4.0\)"):
        run_round(new_model(), path, dp_settings(epsilon=4.0, rounds=1), 2)
    assert path.read_bytes() == before


# ---------------------------------------------------------------- the mechanism
def test_each_unit_is_clipped_to_c_before_the_sum_the_noise_is_added_to(tmp_path, monkeypatch):
    seen = []
    clip_and_accumulate = DPOptimizer.clip_and_accumulate

    def spy(self):
        per_unit = [g.clone() for g in self.grad_samples]
        clip_and_accumulate(self)
        seen.append((per_unit, [p.summed_grad.clone() for p in self.params], self.max_grad_norm))

    sampled = []
    units_loss_of = privacy.units_loss

    def count_units(model, units):
        sampled.append(len(units))
        return units_loss_of(model, units)

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", spy)
    monkeypatch.setattr(privacy, "units_loss", count_units)
    c = 0.05  # below every unit's gradient norm here, so clipping is active
    report = run_round(new_model(), tmp_path / "privacy.json", dp_settings(clip=c), 1)
    assert len(seen) == report["steps"] == 4
    assert sum(u[0].shape[0] for u, _, _ in seen) == sum(sampled) > 0  # one clipped gradient per unit, not row
    clipped_any = False
    for per_unit, summed, max_norm in seen:
        assert max_norm == c
        n = per_unit[0].shape[0]
        if n == 0:
            assert all(s.abs().sum() == 0 for s in summed)
            continue
        norms = torch.stack([g.reshape(n, -1).norm(dim=1) for g in per_unit], dim=1).norm(dim=1)
        factors = (c / (norms + 1e-6)).clamp(max=1.0)
        clipped_norms = norms * factors
        assert (clipped_norms <= c * (1 + 1e-5)).all()
        clipped_any |= bool((norms > c).any())
        for g, s in zip(per_unit, summed):  # what the noise is added to: the sum of the clipped units
            torch.testing.assert_close(s, torch.einsum("i,i...", factors, g), atol=1e-6, rtol=1e-5)
    assert clipped_any


def test_the_noise_does_not_follow_the_public_seed(tmp_path):
    a, b = new_model(), new_model()
    state = torch.random.get_rng_state()
    run_round(a, tmp_path / "a.json", dp_settings(), 1, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the public RNG is neither used nor moved
    run_round(b, tmp_path / "b.json", dp_settings(), 1, seed=7)
    wa, wb = a.shared_state(), b.shared_state()
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(x, y) for x, y in zip(a.default_head_state().values(), b.default_head_state().values()))


# ---------------------------------------------------------------- the client round
class NoCallLLM:
    """The round's labels are given; an LLM call would be a bug."""

    name, stats = "no-calls", LLMStats()

    def complete(self, *args, **kwargs):
        raise AssertionError("this test gives the labels; the LLM must not be called")


def test_a_spent_budget_stops_training_and_returns_the_arrays_unchanged(tmp_path, monkeypatch):
    split = make_synthetic("LaMP_2M", n_users=1, seed=0)
    state = ClientState.create(tmp_path / "client", split.task, split.users, "train")
    cfg = get_config("cpu", max_length=64, train_layers=1, epochs=1, batch_size=6)
    uid = split.users[0].id
    monkeypatch.setattr(trainer, "module_examples", lambda *a, **k: pointwise(users=(uid,)))
    dp = dp_settings(epsilon=0.0, noise_multiplier=1.0, max_epsilon=1e9, rounds=1)
    sent = {k: v.numpy() for k, v in hydra.shared_arrays(hydra.HydraModels.new(cfg), ("reranker",)).items()}
    trained, metrics = trainer.train_round(state, NoCallLLM(), cfg, "reranker", sent, 1, privacy=dp)
    # 4 units of 3 rows, 2 per expected batch: q = 1/2, 2 steps a round
    assert metrics["dp-exhausted"] == 0 and metrics["dp-steps"] == 2 and metrics["dp-sample-rate"] == 0.5
    assert any(not np.array_equal(trained[k], sent[k]) for k in sent)
    two_rounds = RDPAccountant()
    two_rounds.history = [(1.0, 0.5, 4)]
    cap = (metrics["dp-epsilon-spent"] + two_rounds.get_epsilon(DELTA)) / 2  # a second round would pass it
    dp = dp_settings(epsilon=0.0, noise_multiplier=1.0, max_epsilon=cap, rounds=1)
    files = {p: p.read_bytes() for p in (state.privacy_ledger_path, state.model_path("reranker"))}
    returned, spent = trainer.train_round(state, NoCallLLM(), cfg, "reranker", trained, 2, privacy=dp)
    assert spent["dp-exhausted"] == 1 and spent["dp-steps"] == 0
    assert spent["dp-epsilon-spent"] == metrics["dp-epsilon-spent"] <= cap
    assert returned.keys() == trained.keys() and all(np.array_equal(returned[k], trained[k]) for k in trained)
    assert all(p.read_bytes() == b for p, b in files.items())  # nothing trained, saved or spent
    assert spent.keys() == metrics.keys()  # Flower's FedAvg needs the same metric keys in every reply
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in spent.values())


# ---------------------------------------------------------------- provenance of labels
class FixedLLM:
    name, stats = "fixed", LLMStats()

    def complete(self, messages, n=1, temperature=0.0, max_tokens=64, seed=0):
        return ["comedy"] * n


def test_labels_name_the_profile_items_each_example_carries():
    split = make_synthetic("LaMP_2M", n_users=1, seed=2)
    task, user = split.task, split.users[0]
    cfg = get_config("cpu", pseudo_queries=2, retrieve=3, k=2, candidates=2, adapter_label_queries=2)
    pqs = labels.pseudo_queries(task, FixedLLM(), user, cfg)
    ids = {task.item_text(p): str(p["id"]) for p in user.profile}
    for e in labels.reranker_examples(task, FixedLLM(), Retriever(task), user, pqs, cfg):
        own = next(pq.item_id for pq in pqs if pq.content == e.query)
        assert e.sources == [own, ids[e.text]]
    groups = labels.adapter_examples(task, FixedLLM(), Retriever(task), user, pqs, cfg, None)
    for g in groups[:len(pqs)]:
        pq = next(pq for pq in pqs if pq.content == g.query)
        assert g.sources[0] == pq.item_id and len(g.sources) == 1 + cfg.retrieve
    for g in groups[len(pqs):]:  # label-set queries: their own item, then the k neighbours whose labels they weigh
        near = Retriever(task).top(user, g.query, cfg.k, exclude_ids=(ids[g.query],))
        assert g.sources == [ids[g.query]] + [str(i["id"]) for i in near]
    assert privacy.item_units(privacy.privacy_units(groups)) >= 1


# ---------------------------------------------------------------- the server's side
class RepliesGrid:
    """A Grid whose nodes answer a train message with fixed (arrays, metrics) per node id."""

    def __init__(self, answers: dict[int, tuple[dict, dict]]):
        self.answers = answers

    def get_node_ids(self):
        return list(self.answers)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

        out = []
        for msg in messages:
            arrays, metrics = self.answers[msg.metadata.dst_node_id]
            content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                  "metrics": MetricRecord(metrics)})
            out.append(Message(content, reply_to=msg))
        return out


def test_the_server_logs_a_spent_client_and_the_round_proceeds(monkeypatch, caplog):
    from flwr.supercore.task_identity import TaskIdentity

    from fedhydra.common import settings
    from fedhydra.server import server_app
    from fedhydra.server.strategy import make_strategy

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # messages are made inside a run
        monkeypatch.setattr(TaskIdentity, attr, value)
    sent = {"reranker/base/w": np.zeros(3, dtype=np.float32)}
    common = {"num-examples": 3, "users": 1, "loss": 0.5, "accuracy": 1.0, "llm-calls": 0, "tokens": 0,
              "cache-hits": 0, "seconds": 1.0, "dp-epsilon-spent": 2.5, "dp-delta": DELTA}
    grid = RepliesGrid({1: ({"reranker/base/w": np.ones(3, dtype=np.float32)}, {**common, "dp-exhausted": 0}),
                        2: (sent, {**common, "num-examples": 1, "loss": 0.0, "dp-exhausted": 1})})
    values = settings.defaults()
    with caplog.at_level("INFO", logger="flwr"):
        new, record = server_app.train_round(grid, values, make_strategy(values), 1, "reranker", [1, 2], sent, "")
    np.testing.assert_allclose(new["reranker/base/w"], 0.75)  # (3 * 1 + 1 * 0) / 4: the spent client weighs 1
    spent = [r for r in caplog.records if "record-level DP budget" in r.getMessage()]
    assert len(spent) == 1 and "node 2" in caplog.text and "epsilon 2.500" in caplog.text
