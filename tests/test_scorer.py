"""HydraScorer: head lookup, default-head fallback, the shared/personal state split, cache, save/load."""

from __future__ import annotations

import pytest
import torch

from fedhydra.common.scorer import DEFAULT_HEAD, HydraScorer, head_key

QUERY = "which pet?"
TEXTS = ["a cat on the sofa", "a dog in the garden", "stock prices fell sharply today"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def model() -> HydraScorer:
    torch.manual_seed(0)
    m = HydraScorer(max_length=64, device="cpu")
    m.add_user("alice")
    m.add_user("bob")
    return m


def _heads(m: HydraScorer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.heads.state_dict().items()}


def _base(m: HydraScorer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.encoder.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_head_keys_are_valid_and_distinct():
    ids = ["a.b", "a_2e_b", "a b", "train", "__default__", "ü", "42", "u_x"]
    keys = [head_key(i) for i in ids]
    assert len(set(keys)) == len(ids)
    assert all("." not in k and k != DEFAULT_HEAD for k in keys)
    m = torch.nn.ModuleDict({k: torch.nn.Linear(1, 1) for k in keys})  # ModuleDict accepts all of them
    assert len(m) == len(ids)
    with pytest.raises(ValueError, match="non-empty string"):
        head_key("")


def test_user_head_lookup_and_default_fallback(model):
    assert model.users == ["alice", "bob"]
    assert model.head("alice") is not model.head("bob")
    assert model.head("nobody") is model.heads[DEFAULT_HEAD]
    unknown = model.score("nobody", QUERY, TEXTS)
    model.eval()
    with torch.no_grad():
        feats = model.encode([QUERY] * len(TEXTS), TEXTS)
        expect = torch.softmax(model.heads[DEFAULT_HEAD](feats), -1)[:, 1]
        alice = torch.softmax(model.head("alice")(feats), -1)[:, 1]
    assert unknown == pytest.approx(expect.tolist(), abs=1e-6)
    assert model.score("alice", QUERY, TEXTS) == pytest.approx(alice.tolist(), abs=1e-6)
    assert not torch.allclose(alice, expect)  # different heads, different scores
    assert all(0.0 < s < 1.0 for s in unknown)
    assert model.score("alice", QUERY, []) == []


def test_add_user_is_deterministic_and_refuses_duplicates(model):
    torch.manual_seed(7)
    first = {k: v.clone() for k, v in model.add_user("carol").state_dict().items()}
    torch.manual_seed(7)
    again = model.add_user("carol", replace=True).state_dict()
    assert _same(first, dict(again))
    with pytest.raises(ValueError, match="already has a head"):
        model.add_user("carol")


def test_mixed_user_batch_equals_per_user_scoring(model):
    users = ["alice", "bob", "alice", "nobody"]
    texts = TEXTS + ["a parrot"]
    model.eval()
    with torch.no_grad():
        mixed = torch.softmax(model(users, [QUERY] * 4, texts), -1)[:, 1].tolist()
    single = [model.score(u, QUERY, [t])[0] for u, t in zip(users, texts)]
    assert mixed == pytest.approx(single, abs=1e-5)


def test_shared_state_is_exactly_the_trainable_top_layers(model):
    shared = model.shared_state()
    trainable = {n for n, p in model.encoder.named_parameters() if p.requires_grad}
    assert set(shared) == trainable and len(shared) > 0
    assert all(n.startswith(("encoder.layer.4.", "encoder.layer.5.")) for n in shared)
    assert not any(p.requires_grad for p in model.encoder.embeddings.parameters())
    assert not any(p.requires_grad for layer in list(model.layers)[:4] for p in layer.parameters())
    n_layer = sum(p.numel() for p in model.layers[5].parameters())
    assert sum(t.numel() for t in shared.values()) == 2 * n_layer
    assert model.encoder.pooler is None  # no unused trainable pooler (Opacus pitfall 2)


def test_load_shared_state_changes_no_head_and_is_strict(model):
    heads = _heads(model)
    new = {k: v + 0.5 for k, v in model.shared_state().items()}
    model.load_shared_state(new)
    assert _same(model.shared_state(), new)
    assert _same(_heads(model), heads)
    with pytest.raises(ValueError, match="missing keys"):
        model.load_shared_state(dict(list(new.items())[1:]))
    bad = dict(new)
    first = next(iter(bad))
    bad[first] = torch.zeros(3)
    with pytest.raises(ValueError, match="has shape"):
        model.load_shared_state(bad)
    with pytest.raises(ValueError, match="unexpected keys"):
        model.load_shared_state({**new, "heads.x": torch.zeros(1)})


def test_load_personal_state_changes_no_base(model):
    base = _base(model)
    default = model.default_head_state()
    state = {k: torch.randn_like(v) for k, v in model.personal_state("alice").items()}
    model.load_personal_state("alice", state)
    model.load_personal_state("dave", state)  # a new user gets a head with that state
    assert _same(model.personal_state("alice"), state) and _same(model.personal_state("dave"), state)
    assert _same(_base(model), base)
    assert _same(model.default_head_state(), default)
    with pytest.raises(KeyError, match="no head"):
        model.personal_state("nobody")
    with pytest.raises(ValueError, match="missing keys"):
        model.load_personal_state("alice", {"out_proj.weight": state["out_proj.weight"]})


def test_default_head_state_round_trip(model):
    state = {k: torch.randn_like(v) for k, v in model.default_head_state().items()}
    alice = model.personal_state("alice")
    model.load_default_head_state(state)
    assert _same(model.default_head_state(), state)
    assert _same(model.personal_state("alice"), alice)


def test_one_layer_heads_and_layer_bounds():
    m = HydraScorer(max_length=64, head_layers=1, train_layers=1, cache_mb=0, device="cpu")
    assert set(m.default_head_state()) == {"out_proj.weight", "out_proj.bias"}
    assert all(n.startswith("encoder.layer.5.") for n in m.shared_state())
    assert len(m.score("x", QUERY, TEXTS)) == 3
    with pytest.raises(ValueError, match="train_layers=7"):
        HydraScorer(max_length=64, train_layers=7)


def test_frozen_cache_gives_the_uncached_scores_in_train_and_eval(model):
    assert model._split, "MiniLM must run layer by layer (the cache depends on it)"
    uncached = HydraScorer(max_length=64, cache_mb=0, device="cpu")
    uncached.load_shared_state(model.shared_state())
    uncached.load_default_head_state(model.default_head_state())
    ref = uncached.score("x", QUERY, TEXTS)
    model.clear_cache()
    assert model.score("x", QUERY, TEXTS[:2]) == pytest.approx(ref[:2], abs=1e-5)  # fills 2 rows
    assert model.score("x", QUERY, TEXTS) == pytest.approx(ref, abs=1e-5)  # 2 hits + 1 miss
    stats = model.cache_stats()
    assert stats["hits"] == 2 and stats["entries"] == 3
    # The frozen part ignores train mode, so a cached row equals a fresh one during training.
    model.train()
    enc = model.tokenize([QUERY] * 3, TEXTS)
    cached = model._cache.hidden(enc, [(QUERY, t) for t in TEXTS], model._frozen_hidden)
    fresh = model._frozen_hidden(enc)
    assert torch.allclose(cached * enc["attention_mask"][..., None], fresh * enc["attention_mask"][..., None],
                          atol=1e-5)


def test_train_mode_keeps_frozen_part_in_eval(model):
    model.train()
    assert model.training and model.top_layers[0].training and model.heads["__default__"].training
    assert not model.encoder.embeddings.training and not model.layers[0].training
    model.eval()
    assert not model.top_layers[0].training and not model.head("alice").training


def test_save_load_round_trip_gives_identical_scores(model, tmp_path):
    model.load_shared_state({k: v * 1.01 for k, v in model.shared_state().items()})
    path = tmp_path / "models" / "reranker.safetensors"
    model.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["reranker.safetensors"]  # no temp file left
    loaded = HydraScorer.load(path, device="cpu")
    assert loaded.users == model.users and loaded.max_length == 64
    for user in ("alice", "bob", "nobody"):
        assert loaded.score(user, QUERY, TEXTS) == model.score(user, QUERY, TEXTS)
    assert _same(loaded.shared_state(), model.shared_state())


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="no saved scorer"):
        HydraScorer.load(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not a saved HydraScorer"):
        HydraScorer.load(other)


def test_load_refuses_a_different_frozen_base(model, tmp_path):
    with torch.no_grad():
        model.encoder.embeddings.word_embeddings.weight[0, 0] += 1.0  # frozen weights unlike the package's
    path = tmp_path / "adapter.safetensors"
    model.save(path)
    with pytest.raises(ValueError, match="frozen weights differ"):
        HydraScorer.load(path, device="cpu")


def test_bad_inputs_get_clear_errors(model):
    with pytest.raises(TypeError, match="must be strings"):
        model.score("alice", QUERY, [None])
    with pytest.raises(ValueError, match="batch_size"):
        model.score("alice", QUERY, TEXTS, batch_size=0)
    with pytest.raises(ValueError, match="2 user ids for 3 rows"):
        model(["a", "b"], [QUERY] * 3, TEXTS)
