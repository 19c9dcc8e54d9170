"""Train and fit stages: what each may change, and that per-user heads learn opposite preferences."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedhydra.common import settings
from fedhydra.common.config import get_config
from fedhydra.common.examples import CandidateGroup, ScoredExample, batch_loss, ranked_queries
from fedhydra.common.hydra import fit_heads
from fedhydra.common.scorer import DEFAULT_HEAD, HydraScorer
from fedhydra.common.training import adamw_linear_decay, fit_stage, round_lr_span, train_stage

QUERY = "which pet?"
TEMPLATES = ["a photo of a {}", "my {} is sleeping", "the {} ran away", "I fed the {} today",
             "a small {} in the garden", "the neighbour's {} is loud"]


def pet_examples(user: str, liked: str) -> list[ScoredExample]:
    """The user labels texts about `liked` positive and the other pet negative."""
    return [ScoredExample(user, QUERY, t.format(a), int(a == liked)) for t in TEMPLATES for a in ("cat", "dog")]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def model() -> HydraScorer:
    torch.manual_seed(0)
    return HydraScorer(max_length=64, device="cpu")


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_scored_example_validates():
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        ScoredExample("u", "q", "t", 2)
    with pytest.raises(ValueError, match="non-empty string"):
        ScoredExample("", "q", "t", 1)
    with pytest.raises(TypeError, match="must be strings"):
        ScoredExample("u", "q", None, 1)


def test_stages_reject_bad_arguments(model):
    with pytest.raises(ValueError, match="no training examples"):
        train_stage(model, [], progress=False)
    with pytest.raises(ValueError, match="epochs"):
        fit_stage(model, pet_examples("a", "cat"), epochs=0, progress=False)
    with pytest.raises(ValueError, match="learning rates"):
        train_stage(model, pet_examples("a", "cat"), head_lr=-1.0, progress=False)


def test_train_stage_changes_top_layers_heads_and_default_not_lower_layers(model):
    base, default = _params(model.encoder), _params(model.heads[DEFAULT_HEAD])
    model.add_user("bystander")
    bystander = _params(model.head("bystander"))
    metrics = train_stage(model, pet_examples("a", "cat"), epochs=1, batch_size=6, progress=False)
    assert metrics["steps"] == 2 and metrics["examples"] == 12 and metrics["users"] == 1
    assert metrics["loss"] == pytest.approx(metrics["user_loss"] + metrics["default_loss"])
    after = _params(model.encoder)
    changed = {n for n in base if not torch.equal(base[n], after[n])}
    trainable = set(model.shared_state())
    assert changed and changed <= trainable
    assert all(torch.equal(base[n], after[n]) for n in base if n not in trainable)  # embeddings, layers 0-3
    assert any(not torch.equal(default[n], p) for n, p in model.heads[DEFAULT_HEAD].named_parameters())
    assert model.has_user("a")
    assert all(torch.equal(bystander[n], p) for n, p in model.head("bystander").named_parameters())


def test_train_stage_is_reproducible_for_a_seed(model):
    examples = pet_examples("a", "cat")[:6]
    train_stage(model, examples, epochs=1, batch_size=3, seed=3, progress=False)
    torch.manual_seed(0)
    other = HydraScorer(max_length=64, device="cpu")
    train_stage(other, examples, epochs=1, batch_size=3, seed=3, progress=False)
    assert all(torch.equal(model.shared_state()[n], t) for n, t in other.shared_state().items())
    assert all(torch.equal(model.personal_state("a")[n], t) for n, t in other.personal_state("a").items())


def test_a_long_stage_says_how_far_it_is(model, monkeypatch):
    from fedhydra.common import training
    monkeypatch.setattr(training, "PROGRESS_EVERY_S", 0.0)  # every step counts as long
    lines: list[str] = []
    train_stage(model, pet_examples("a", "cat"), epochs=2, batch_size=6, say=lines.append)
    steps = [line for line in lines if ": step " in line]
    assert [line.split(",")[0] for line in steps] == ["epoch 1/2: step 1/2", "epoch 1/2: step 2/2",
                                                       "epoch 2/2: step 1/2", "epoch 2/2: step 2/2"]
    assert steps[-1].endswith("about 0 min 0 s left") and "min" in steps[0]
    assert [line for line in lines if "mean loss" in line][0].startswith("epoch 1/2: mean loss")


def _rates(total_steps: int, lr_span: tuple[float, float]) -> list[float]:
    """The learning rate of each of `total_steps` steps under adamw_linear_decay (base rate 1)."""
    weight = torch.nn.Parameter(torch.zeros(1))
    opt, sched = adamw_linear_decay([{"params": [weight], "lr": 1.0}], total_steps, lr_span)
    rates = []
    for _ in range(total_steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


def test_run_schedule_rounds_follow_the_centralized_decay_over_rounds_x_epochs():
    rounds, steps = 3, 4
    federated = [r for m in range(1, rounds + 1) for r in _rates(steps, round_lr_span("run", m, rounds))]
    assert federated == pytest.approx(_rates(rounds * steps, (1.0, 0.0)))
    assert round_lr_span("run", rounds, rounds) == pytest.approx((1 / 3, 0.0))
    assert all(round_lr_span("round", m, rounds) == (1.0, 0.0) for m in range(1, rounds + 1))
    assert _rates(steps, round_lr_span("round", 2, rounds)) == pytest.approx([1.0, 0.75, 0.5, 0.25])
    with pytest.raises(ValueError, match="outside 1..3"):
        round_lr_span("run", 4, rounds)
    with pytest.raises(ValueError, match="unknown lr schedule 'cosine'"):
        round_lr_span("cosine", 1, rounds)
    with pytest.raises(ValueError, match="lr_span"):
        _rates(steps, (0.5, 0.75))


def test_train_stage_runs_its_lr_span(model):
    """A span of zero rates leaves the shared base and the heads untouched (AdamW's decay is scaled by the rate too)."""
    before = model.shared_state()
    before = {n: t.clone() for n, t in before.items()}
    train_stage(model, pet_examples("a", "cat"), epochs=1, batch_size=6, progress=False, lr_span=(0.0, 0.0))
    assert all(torch.equal(before[n], t) for n, t in model.shared_state().items())
    train_stage(model, pet_examples("a", "cat"), epochs=1, batch_size=6, progress=False, lr_span=(0.5, 0.0))
    assert any(not torch.equal(before[n], t) for n, t in model.shared_state().items())


def test_fit_stage_keeps_base_bit_identical_and_fits_only_its_users(model):
    model.add_user("old")
    model.add_user("c")
    base, old, default = _params(model.encoder), _params(model.head("old")), _params(model.heads[DEFAULT_HEAD])
    c_before = _params(model.head("c"))
    examples = pet_examples("c", "cat") + pet_examples("new", "dog")
    metrics = fit_stage(model, examples, epochs=2, lr=1e-3, batch_size=8, progress=False)
    assert metrics["steps"] == 6 and metrics["users"] == 2
    assert all(torch.equal(base[n], p) for n, p in model.encoder.named_parameters())
    assert all(torch.equal(old[n], p) for n, p in model.head("old").named_parameters())
    assert all(torch.equal(default[n], p) for n, p in model.heads[DEFAULT_HEAD].named_parameters())
    assert model.has_user("new")
    assert all(not torch.equal(c_before[n], p) for n, p in model.head("c").named_parameters())
    assert all(p.requires_grad for p in model.trainable_base_parameters())  # fit leaves the base trainable


def test_fit_stage_random_init_reinitialises(model):
    model.add_user("c")
    with torch.no_grad():
        for p in model.head("c").parameters():
            p.fill_(3.0)
    fit_stage(model, pet_examples("c", "cat"), epochs=1, lr=1e-5, init="random", progress=False)
    assert model.head("c").out_proj.weight.detach().abs().max().item() < 1.0  # fresh init, not the 3.0s


def test_warm_started_heads_equal_the_default_head_before_fitting(model):
    with torch.no_grad():
        for p in model.heads[DEFAULT_HEAD].parameters():
            p.add_(0.5)  # a default head unlike any fresh initialisation
    default = _params(model.heads[DEFAULT_HEAD])
    model.add_user("warm", from_default=True)
    assert all(torch.equal(default[n], p) for n, p in model.head("warm").named_parameters())
    assert model.head("warm") is not model.heads[DEFAULT_HEAD]
    # fit_stage's default init starts each user there: with a negligible step the head stays at the default
    fit_stage(model, pet_examples("newcomer", "dog"), epochs=1, lr=1e-12, progress=False)
    assert all(torch.allclose(default[n], p, atol=1e-6) for n, p in model.head("newcomer").named_parameters())
    with pytest.raises(ValueError, match="init must be"):
        fit_stage(model, pet_examples("x", "dog"), init="zeros", progress=False)


def pet_groups(user: str, liked: str, held_out: bool = False) -> list[CandidateGroup]:
    """Each query's candidates mention both pets; texts about `liked` grade 0.9, the other 0.1."""
    return [CandidateGroup(user, QUERY, [t.format("cat"), t.format("dog")], [0.9 if liked == "cat" else 0.1,
                                                                            0.1 if liked == "cat" else 0.9],
                           held_out=held_out) for t in TEMPLATES]


def test_listwise_groups_teach_each_user_to_rank_candidates(model):
    examples = pet_groups("cat_lover", "cat") + pet_groups("dog_lover", "dog")
    metrics = train_stage(model, examples, epochs=4, lr=5e-5, head_lr=3e-3, batch_size=8, progress=False)
    assert metrics["examples"] == 12 and metrics["accuracy"] >= 0.8
    pair = ["there is a cat on the roof", "there is a dog on the roof"]
    cat, dog = model.log_odds("cat_lover", QUERY, pair), model.log_odds("dog_lover", QUERY, pair)
    assert cat[0] > cat[1] and dog[1] > dog[0]


def test_the_listwise_loss_is_the_expected_risk_of_the_scorers_pick():
    groups = [CandidateGroup("a", "q", ["x", "y", "z"], [0.2, 0.9, 0.5]), CandidateGroup("b", "q", ["x", "y"], [1.0, 0.0])]
    scores = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.0], requires_grad=True)
    logits = torch.stack([torch.zeros(5), scores], dim=1)  # log-odds = scores
    loss, correct = batch_loss(groups, logits)
    risk_a = (torch.softmax(scores[:3], 0) * torch.tensor([0.8, 0.1, 0.5])).sum()
    risk_b = (torch.softmax(scores[3:], 0) * torch.tensor([0.0, 1.0])).sum()
    assert loss.item() == pytest.approx(((risk_a + risk_b) / 2).item()) and correct == 2
    loss.backward()
    assert scores.grad[1] < 0 < scores.grad[0] and scores.grad[3] < 0  # descent raises each query's best candidate
    # its infimum is the best pick's cost: all the probability on the best-graded candidate
    certain = torch.stack([torch.zeros(3), torch.tensor([0.0, 50.0, 0.0])], dim=1)
    assert batch_loss(groups[:1], certain)[0].item() == pytest.approx(0.1, abs=1e-6)


def test_the_best_loss_keeps_a_gradient_where_the_risk_has_saturated_on_a_wrong_pick():
    """Adapter-loss "best": -log of the softmax mass on the best-graded candidates. Where the scores are confidently
    on a wrong candidate the risk's gradient vanishes (so Adam drifts on its sign) while this one stays near 1."""
    group = [CandidateGroup("a", "q", ["5", "4", "4"], [0.5, 1.0, 1.0])]  # two copies of the best answer
    scores = torch.tensor([20.0, 0.0, 0.0], requires_grad=True)
    logits = torch.stack([torch.zeros(3), scores], dim=1)
    risk, _ = batch_loss(group, logits)
    (risk_grad,) = torch.autograd.grad(risk, scores)
    best, correct = batch_loss(group, logits, "best")
    assert correct == 0
    assert best.item() == pytest.approx(-torch.log(torch.softmax(scores, 0)[1:].sum()).item())
    (best_grad,) = torch.autograd.grad(best, scores)
    assert risk_grad.abs().max() < 1e-6 < 0.9 < best_grad[0]  # descent lowers the wrong pick
    assert best_grad[1] == best_grad[2] < 0  # the copies of the best answer share the mass, not played off
    tied = torch.stack([torch.zeros(3), torch.tensor([0.0, 30.0, -30.0])], dim=1)
    assert batch_loss(group, tied, "best")[0].item() == pytest.approx(0.0, abs=1e-6)  # all mass on a best copy
    with pytest.raises(ValueError, match="unknown listwise loss 'hinge'"):
        batch_loss(group, logits, "hinge")


def test_the_runs_listwise_loss_reaches_new_and_loaded_adapters(tmp_path, monkeypatch):
    from fedhydra.common import training
    from fedhydra.common.config import get_config
    from fedhydra.common.hydra import HydraModels, use_run_settings

    cfg = get_config("cpu", adapter_loss="best", feature_lr=0.5, max_length=32)
    models = HydraModels.new(cfg, device="cpu")
    assert models.adapter.listwise_loss == "best" and models.adapter.candidate_weights.fixed_lr == 0.5
    assert models.reranker.listwise_loss == "risk"  # pointwise: the reranker has no listwise loss to choose
    models.adapter.save(tmp_path / "adapter.safetensors")
    loaded = HydraScorer.load(tmp_path / "adapter.safetensors", device="cpu")
    assert loaded.listwise_loss == "risk"  # a file keeps no training setting: the run's is applied on load
    use_run_settings(HydraModels(models.reranker, loaded), cfg)
    assert loaded.listwise_loss == "best" and loaded.candidate_weights.fixed_lr == 0.5
    seen = []
    real = training.batch_loss
    monkeypatch.setattr(training, "batch_loss", lambda b, l, listwise="risk": seen.append(listwise) or real(b, l, listwise))
    group = CandidateGroup("u", QUERY, ["a cat", "a dog"], [1.0, 0.0], [[0.0] * loaded.extra] * 2)
    train_stage(loaded, [group], epochs=1, lr=1e-4, head_lr=1e-3, batch_size=8, progress=False)
    fit_stage(loaded, [CandidateGroup("w", QUERY, group.texts, [0.0, 1.0], group.features)], epochs=1,
              batch_size=8, progress=False)
    assert seen == ["best"] * 3  # the train step's user and default heads, then the fit step


def test_held_out_groups_are_never_trained_on(model):
    before = _params(model.encoder)
    with pytest.raises(ValueError, match="no training examples"):
        train_stage(model, pet_groups("a", "cat", held_out=True), progress=False)
    assert all(torch.equal(before[n], p) for n, p in model.encoder.named_parameters())
    metrics = train_stage(model, pet_groups("a", "cat") + pet_groups("b", "dog", held_out=True), epochs=1,
                          progress=False)
    assert metrics["examples"] == 6 and metrics["users"] == 1 and not model.has_user("b")


def test_mixed_kinds_of_examples_are_refused(model):
    with pytest.raises(TypeError, match="must all be ScoredExample or all CandidateGroup"):
        train_stage(model, pet_examples("a", "cat") + pet_groups("a", "cat"), progress=False)


def test_train_stage_learns_opposite_preferences_per_user(model):
    examples = pet_examples("cat_lover", "cat") + pet_examples("dog_lover", "dog")
    metrics = train_stage(model, examples, epochs=4, lr=5e-5, head_lr=3e-3, batch_size=8, progress=False)
    assert metrics["accuracy"] >= 0.8
    held_out = ["there is a cat on the roof", "there is a dog on the roof"]
    cat_lover = model.score("cat_lover", QUERY, held_out)
    dog_lover = model.score("dog_lover", QUERY, held_out)
    # The same pair scored differently per user: the personalization property.
    assert cat_lover[0] > cat_lover[1] + 0.2
    assert dog_lover[1] > dog_lover[0] + 0.2


def test_fit_stage_personalizes_an_unseen_user_on_a_frozen_base(model):
    fit_stage(model, pet_examples("newcomer", "dog"), epochs=8, lr=2e-5, head_lr=3e-3, batch_size=4, progress=False)
    scores = model.score("newcomer", QUERY, ["there is a cat on the roof", "there is a dog on the roof"])
    assert scores[1] > scores[0] + 0.3


def test_feature_weights_are_shared_start_at_zero_have_their_own_lr_and_stay_frozen_in_fit():
    from fedhydra.common.scorer import FEATURE_WEIGHTS

    FEATURE_LR = settings.SETTINGS["feature-lr"].default
    from fedhydra.common.training import param_groups

    torch.manual_seed(0)
    model = HydraScorer(max_length=64, device="cpu", extra=3)
    texts, features = ["a cat", "a dog"], [[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]
    model.eval()
    with torch.no_grad():  # no feature term yet: the scorer starts as HYDRA's
        plain = model.heads[DEFAULT_HEAD](model.encode([QUERY] * 2, texts))
    assert torch.allclose(model.logits("anyone", QUERY, texts, features), plain)
    assert FEATURE_WEIGHTS in model.shared_state()  # shared: averaged by federation, never in a user's head
    model.add_user("u")
    assert not any("candidate" in k for k in model.personal_state("u"))
    groups = param_groups(model.shared_modules(), lr=1e-3, weight_decay=0.01)
    scaled = [g for g in groups if any(p is model.candidate_weights.weight for p in g["params"])]
    assert len(scaled) == 1 and scaled[0]["params"] == [model.candidate_weights.weight]
    assert scaled[0]["lr"] == FEATURE_LR and scaled[0]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="3 candidate features"):
        model.logits("u", QUERY, texts, [[1.0, 0.0], [0.0, 1.0]])

    group = CandidateGroup("v", QUERY, texts, [1.0, 0.0], features)
    train_stage(model, [group], epochs=2, lr=1e-4, head_lr=1e-3, batch_size=8, progress=False)
    trained = model.candidate_weights.weight.detach().clone()
    assert trained.abs().sum() > 0  # the train stage moves them
    fit_stage(model, [CandidateGroup("w", QUERY, texts, [0.0, 1.0], features)], epochs=3, head_lr=1e-2,
              batch_size=8, progress=False)
    assert torch.equal(model.candidate_weights.weight, trained)  # part of the frozen base in the fit stage


def test_fit_heads_gives_a_head_only_to_users_whose_history_ranks_enough_queries(model):
    """fit-min-queries: a user whose queries rank fewer than the minimum (capped at pseudo-queries) answers with the
    default head, and loses a head an earlier fit gave it; 0 fits every user with examples (HYDRA's way)."""
    cfg = get_config("cpu", fit_min_queries=2, pseudo_queries=3, fit_epochs=1, batch_size=8)
    rich = [ScoredExample("rich", f"{QUERY} {i}", t.format(a), int(a == "cat"))
            for i in range(2) for t in TEMPLATES[:2] for a in ("cat", "dog")]
    thin = [ScoredExample("thin", "q1", "a cat", 1), ScoredExample("thin", "q1", "a dog", 0),
            ScoredExample("thin", "q2", "a cat", 0), ScoredExample("thin", "q2", "a dog", 0)]  # q2 ranks nothing
    groups = [CandidateGroup("g", QUERY, ["a", "b"], [1.0, 0.0]), CandidateGroup("g", "q", ["a", "b"], [0.5, 0.5]),
              CandidateGroup("g", "q3", ["a", "b"], [1.0, 0.0], held_out=True)]
    assert ranked_queries(rich + thin) == {"rich": 2, "thin": 1} and ranked_queries(groups) == {"g": 1}
    model.add_user("thin")
    report = fit_heads(model, rich + thin, ["rich", "thin", "silent"], cfg)
    assert report["heads_fitted"] == 1 and report["default_head_users"] == 2 and report["users"] == 1
    assert model.users == ["rich"]
    assert fit_heads(model, thin, ["thin"], replace(cfg, pseudo_queries=1))["heads_fitted"] == 1  # the cap
    assert model.has_user("thin")
    report = fit_heads(model, [e for e in thin if e.query == "q2"], ["thin", "silent"], replace(cfg, fit_min_queries=0))
    assert report["heads_fitted"] == 1 and model.has_user("thin") and not model.has_user("silent")
    with pytest.raises(ValueError, match="fit-min-queries"):
        get_config("cpu", fit_min_queries=-1)
