"""HYDRA end to end with the real embedded LLM and MiniLM: labels, train/fit stages, inference.

Sizes are tiny (2 pseudo-queries, M=3, k=2, B=2, 64 tokens) so the whole module stays within
a couple of minutes on 2 cores; the behaviour under test does not depend on size.
"""

from __future__ import annotations

import torch

from fedhydra.common import labels
from fedhydra.common.config import get_config
from fedhydra.common.hydra import HydraModels, fit, train
from fedhydra.common.pipeline import HydraPipeline
from fedhydra.common.records import User
from fedhydra.common.retrieval import Retriever
from fedhydra.common.synthetic import make_synthetic
from fedhydra.common.tasks import get_task

TINY = dict(pseudo_queries=2, retrieve=3, k=2, candidates=2, max_length=64, epochs=1, batch_size=16,
            lr=5e-5, head_lr=1e-3)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fit_never_sends_the_test_query_or_gold_and_keeps_the_base(llm):
    split = make_synthetic("LaMP_7", n_users=4, seed=3)
    task, cfg = split.task, get_config("cpu", **TINY)
    train_users, test_users = split.users[:2], split.users[2:]
    models = HydraModels.new(cfg)
    train(task, llm, train_users, cfg, models, progress=False)
    base = {m: {k: v.clone() for k, v in getattr(models, m).shared_state().items()} for m in ("reranker", "adapter")}
    llm.requests.clear()

    fit(task, llm, test_users, cfg, models, progress=False)

    sent = "\n".join(llm.prompt_texts())
    assert llm.requests, "the fit stage made no LLM request"
    for user in test_users:
        assert task.content(user.input) not in sent, "a test user's query reached label generation"
        assert user.gold.strip() not in sent, "a test user's gold reached label generation"
    for m in ("reranker", "adapter"):
        assert _same(base[m], getattr(models, m).shared_state()), f"the fit stage changed the {m} base"
        assert all(getattr(models, m).has_user(u.id) for u in test_users)


def test_pseudo_queries_never_retrieve_their_own_item(llm):
    task = get_task("LaMP_2M")
    words = ["robot", "space", "detective", "murder", "love", "wedding"]
    profile = [{"id": f"p{i}", "description": f"A film about {w} and {w}s, number {i}.", "tag": tag}
               for i, (w, tag) in enumerate(zip(words, ["sci-fi", "sci-fi", "violence", "violence",
                                                         "romance", "romance"]))]
    user = User("u1", task.instruction("A film about robot love."), profile, "sci-fi")
    cfg = get_config("cpu", **(TINY | {"pseudo_queries": 6, "retrieve": 5}))
    pqs = labels.pseudo_queries(task, llm, user, cfg)
    assert {pq.item_id for pq in pqs} == {p["id"] for p in profile}
    examples = labels.reranker_examples(task, llm, Retriever(task), user, pqs, cfg)
    assert len(examples) == 6 * 5
    for pq in pqs:
        own = task.item_text(next(p for p in profile if p["id"] == pq.item_id))
        texts = [e.text for e in examples if e.query == pq.content]
        assert len(texts) == 5 and own not in texts


def test_unknown_user_is_served_by_the_default_head(llm):
    split = make_synthetic("LaMP_2M", n_users=3, seed=5)
    task, cfg = split.task, get_config("cpu", **TINY)
    models = HydraModels.new(cfg)
    train(task, llm, split.users[:2], cfg, models, progress=False)
    stranger = split.users[2]
    assert not models.adapter.has_user(stranger.id)
    pipe = HydraPipeline(task, llm, Retriever(task), models.reranker, models.adapter, cfg)
    answer = pipe.answer(stranger)
    query = task.content(stranger.input)
    expected = models.adapter.score("__nobody__", query, answer.candidates)
    assert answer.scores == [float(s) for s in expected]
    assert answer.text == answer.candidates[max(range(len(expected)), key=lambda j: (expected[j], -j))]
    assert len(answer.items) == cfg.k and len(answer.candidates) == cfg.candidates + 1  # greedy + B samples


def test_models_are_built_the_same_for_the_same_seed():
    cfg = get_config("cpu", **TINY)
    torch.manual_seed(123)  # the caller's RNG state must not matter
    a = HydraModels.new(cfg)
    torch.manual_seed(456)
    b = HydraModels.new(cfg)
    for m in ("reranker", "adapter"):
        assert _same(getattr(a, m).default_head_state(), getattr(b, m).default_head_state())
