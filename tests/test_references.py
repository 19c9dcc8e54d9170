"""The references a skeptic asks for (simulations/compare.py) on a small hand-made LaMP-3 / LaMP-4 split read through
the validators, the rating metrics they are scored with, error ratios that read "above 1 is better", results that
name the data set, and the shared Amazon data loading through the same validators."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedhydra.common.data import dataset_name, load_split
from fedhydra.simulations.compare import check_references, paired_ratio, ratios, references
from fedhydra.simulations.results import Outcomes, write_results

AMAZON = Path("/work/shared/data/amazon")
REVIEW = "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 without " \
         "further explanation. review: "


def _split(folder: Path, task: str, questions: list[dict], golds: dict[str, str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "dev_questions.json").write_text(json.dumps(questions), encoding="utf-8")
    outputs = {"task": task, "golds": [{"id": k, "output": v} for k, v in golds.items()]}
    (folder / "dev_outputs.json").write_text(json.dumps(outputs), encoding="utf-8")
    return folder


def _rating_user(uid: str, scores: list[int]) -> dict:
    return {"id": uid, "input": REVIEW + f"review of user {uid}",
            "profile": [{"id": f"{uid}{i}", "text": f"item {i} of {uid}", "score": str(s)} for i, s in enumerate(scores)]}


@pytest.fixture
def rating_split(tmp_path):
    # profile means: a 4.5 (half up: 5; mode tie 4/5 -> 5, the nearer-to-mean rule ties, then the higher),
    # b 1.4 (1; mode 1), c 3.5 (4; mode tie 3/4 -> 4 by the higher), d 2.0 (2; mode 2)
    users = [_rating_user("a", [4, 5]), _rating_user("b", [1, 1, 1, 2, 2]), _rating_user("c", [3, 4]),
             _rating_user("d", [1, 2, 3])]
    golds = {"a": "5", "b": "2", "c": "3", "d": "4"}
    train = [_rating_user("t1", [5]), _rating_user("t2", [3]), _rating_user("t3", [4])]
    return (load_split(_split(tmp_path / "test", "LaMP_3", users, golds)),
            load_split(_split(tmp_path / "train", "LaMP_3", train, {"t1": "4", "t2": "4", "t3": "1"})))


def test_per_user_rating_rules_and_their_mae_on_a_hand_made_split(rating_split):
    test, train = rating_split
    task = test.task
    results, preds = references(task, test.users, ["user-mean", "user-mode", "majority-label"], {}, train.users)
    got = {name: [r["prediction"] for r in rows] for name, rows in preds.items()}
    assert got["user-mean"] == ["5", "1", "4", "2"]
    assert got["user-mode"] == ["5", "1", "4", "2"]
    assert got["majority-label"] == ["4"] * 4  # the training users' golds: 4, 4, 1
    by = {r.method: r.metrics for r in results}
    # |errors| user-mean: 0, 1, 1, 2 -> MAE 1.0, RMSE sqrt(6/4); majority "4": 1, 2, 1, 0 -> MAE 1.0, RMSE sqrt(6/4)
    assert by["user-mean"]["mae"] == pytest.approx(1.0) and by["user-mean"]["rmse"] == pytest.approx((6 / 4) ** 0.5)
    assert by["majority-label"]["mae"] == pytest.approx(1.0)


def test_user_mode_ties_go_to_the_rating_nearest_the_mean_then_the_higher(tmp_path):
    users = [_rating_user("x", [1, 1, 4, 4, 5]), _rating_user("y", [2, 2, 5, 5, 1])]  # means 3.0 and 3.0
    split = load_split(_split(tmp_path / "s", "LaMP_3", users, {"x": "4", "y": "2"}))
    _, preds = references(split.task, split.users, ["user-mode"], {})
    assert [r["prediction"] for r in preds["user-mode"]] == ["4", "2"]


def test_error_ratios_read_above_one_as_better(rating_split):
    test, train = rating_split
    task = test.task
    exact = [{"id": u.id, "prediction": u.gold, "gold": u.gold} for u in test.users]
    bad = [{"id": u.id, "prediction": "1", "gold": u.gold} for u in test.users]  # |errors| 4, 1, 2, 3
    near = [{"id": r["id"], "prediction": p, "gold": r["gold"]} for r, p in zip(exact, "3325")]  # |errors| 2, 1, 1, 1
    q = ratios(task, {"zero-shot": bad, "near": near}, seed=0)
    # the baseline's MAE over the method's: 2.5 / 1.25; never below 1, as near's error is never the larger
    assert q["near"]["baseline"] == "zero-shot" and q["near"]["ratio"] == pytest.approx(2.0)
    assert q["near"]["high"] > q["near"]["low"] >= 1.0
    q = ratios(task, {"rag-1": near, "worse": bad}, seed=0)
    assert q["worse"]["ratio"] == pytest.approx(0.5) and q["worse"]["high"] <= 1.0


def test_paired_ratio_compares_two_methods_on_the_users_both_answered(rating_split):
    test, _ = rating_split
    task = test.task
    bad = [{"id": u.id, "prediction": "1", "gold": u.gold} for u in test.users]  # |errors| 4, 1, 2, 3
    near = [{"id": r["id"], "prediction": p, "gold": r["gold"]} for r, p in zip(bad, "3325")]  # |errors| 2, 1, 1, 1
    q = paired_ratio(task, near, bad, seed=0)
    assert q["ratio"] == pytest.approx(2.0) and q["high"] > q["low"] >= 1.0 and q["users"] == 4
    # only shared users count: without the first user, |errors| 1, 2, 3 against 1, 1, 1
    q = paired_ratio(task, near[1:], bad, seed=0)
    assert q["users"] == 3 and q["ratio"] == pytest.approx(2.0)
    assert paired_ratio(task, bad, near, seed=0)["ratio"] == pytest.approx(0.5)
    assert paired_ratio(task, near, [dict(r, id="other") for r in bad]) is None


def test_first_words_uses_the_training_users_median_title_length(tmp_path):
    def user(uid, text, titles):
        return {"id": uid, "input": f"Generate a headline for the following article: {text}",
                "profile": [{"id": f"{uid}{i}", "text": "some review", "title": t} for i, t in enumerate(titles)]}
    train = load_split(_split(tmp_path / "train", "LaMP_4", [user("t", "x", ["Great", "Works well for me"])],
                              {"t": "Nice strings"}))  # title lengths 1, 4, 2 -> median 2
    test = load_split(_split(tmp_path / "test", "LaMP_4", [user("u", "These strings sound bright and last", ["ok"])],
                             {"u": "Bright strings"}))
    results, preds = references(test.task, test.users, ["first-words", "copy-input"], {}, train.users)
    assert preds["first-words"][0]["prediction"] == "These strings"
    assert results[0].extra["rule"] == "words 2"
    assert preds["copy-input"][0]["prediction"] == "These strings sound bright and last"


def test_references_outside_their_task_kind_are_refused(rating_split):
    test, _ = rating_split
    with pytest.raises(ValueError, match="first-words is a reference for generation"):
        check_references(test.task, ["first-words"])
    with pytest.raises(ValueError, match="needs training users"):
        references(test.task, test.users, ["majority-label"], {}, [])


def test_results_name_the_data_set_not_the_lamp_task(rating_split, tmp_path):
    test, train = rating_split
    (tmp_path / "SOURCES.md").write_text("# Shop reviews as a LaMP-format task\n\ntext\n", encoding="utf-8")
    name = dataset_name(tmp_path / "test", test.task)
    assert name == "Shop reviews, LaMP-3 format"
    assert dataset_name(tmp_path / "test", test.task, "My data") == "My data"
    done = Outcomes(tmp_path / "out")
    done.attempt(["user-mean"], lambda: references(test.task, test.users, ["user-mean"], {}, train.users))
    md = write_results(tmp_path / "out", test.task, done.results, {"data set": name}, done.predictions)
    assert md.read_text().startswith("# Shop reviews, LaMP-3 format\n")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["data set"] == name


@pytest.mark.skipif(not (AMAZON / "rating").is_dir(), reason=f"the shared Amazon data is absent ({AMAZON})")
@pytest.mark.parametrize("folder, task, fields", [("rating", "LaMP_3", {"text", "score"}),
                                                  ("title", "LaMP_4", {"text", "title"})])
def test_the_shared_amazon_data_loads_through_the_validators(folder, task, fields):
    split = load_split(AMAZON / folder, task=task)
    assert split.task.name == task and len(split.users) == 1000
    assert all(u.gold for u in split.users) and min(len(u.profile) for u in split.users) >= 3
    assert fields | {"id"} == set(split.users[0].profile[0])
    assert dataset_name(AMAZON / folder, split.task) == f"Amazon reviews, {task.replace('_', '-')} format"
