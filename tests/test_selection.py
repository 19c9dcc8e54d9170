"""Choosing among candidates: graded targets, features, the training-free rules and the calibrated margin."""

from __future__ import annotations

import math

import pytest

from fedhydra.common import selection
from fedhydra.common.metrics import rouge_pair
from fedhydra.common.tasks import get_task

LAMP7 = get_task("LaMP_7")
MOVIES = get_task("LaMP_2M")
QUERY = "I am so happy that the weekend is finally here"
GOLD = "so happy its finally the weekend!!"
CANDIDATES = ["I am happy it is the weekend.",  # greedy
              "so happy its finally the weekend",
              "Weekends are a time for rest and family.",
              "happy weekend"]


def test_graded_labels_of_a_generation_query_are_ordered_like_the_metric():
    grades = selection.grades(LAMP7, CANDIDATES, GOLD)
    metric = [sum(rouge_pair(c, GOLD)) / 2 for c in CANDIDATES]
    assert grades == pytest.approx(metric)
    order = sorted(range(len(CANDIDATES)), key=lambda j: -grades[j])
    assert order == sorted(range(len(CANDIDATES)), key=lambda j: -metric[j])
    assert order[0] == 1 and order[-1] == 2  # the near-copy first, the off-topic sentence last


def test_classification_grades_are_correctness_and_agreement_is_the_same_label():
    cands = ["comedy", "Comedy, I think", "romance", "not a tag"]
    assert selection.grades(MOVIES, cands, "comedy") == [1.0, 1.0, 0.0, 0.0]
    feats = selection.candidate_features(MOVIES, "a funny film", cands)
    assert [round(f[1], 3) for f in feats] == [round(1 / 3, 3), round(1 / 3, 3), 0.0, 0.0]
    assert selection.mbr(MOVIES, "a funny film", cands) == 0


def test_rating_grades_agreement_and_history_follow_the_absolute_error():
    rating = get_task("LaMP_3")
    # graded like the MAE: one star off is 3/4 right; no number counts as the farther extreme (LaMP)
    assert selection.grades(rating, ["5", "4 stars", "1", "no idea"], "5") == [1.0, 0.75, 0.0, 0.0]
    assert selection.grades(rating, ["no idea"], "3") == [0.5]
    # mbr is MBR under the MAE: the answer nearest the others (their median), not the most frequent one
    assert selection.mbr(rating, "a review", ["1", "4", "5", "5", "3"]) == 1
    feats = selection.candidate_features(rating, "a review", ["5", "1"], 2, history=["4", "4"])
    history = selection.FEATURES.index("history")
    assert [f[history] for f in feats] == [0.75, 0.25]
    assert selection.with_labels(rating, ["5", "4."]) == ["5", "4.", "1", "2", "3"]


def test_the_profile_feature_is_a_rating_users_scale_and_zero_elsewhere():
    rating, profile = get_task("LaMP_3"), selection.FEATURES.index("profile")
    harsh = ["1", "2", "2", "5"]  # median 2: mean distances 1.5, 1, 1.5, 2, 2.5 stars
    feats = selection.candidate_features(rating, "a review", list(rating.labels), 0, profile=harsh)
    assert [f[profile] for f in feats] == [1 - d / 4 for d in (1.5, 1.0, 1.5, 2.0, 2.5)]
    assert max(range(5), key=lambda j: feats[j][profile]) == rating.labels.index("2")
    # frequency: the share of the profile with exactly this rating, which peaks at the mode, not the median
    frequency = selection.FEATURES.index("frequency")
    kind = ["5", "5", "5", "1", "2"]
    assert [f[frequency] for f in feats] == [0.25, 0.5, 0.0, 0.0, 0.25]
    mixed = selection.candidate_features(rating, "a review", ["4 stars", "3"], 2, profile=["4", "4.", "3", "1", "5"])
    assert [f[frequency] for f in mixed] == [0.4, 0.2]  # "4", "4." and "4 stars" are the same rating
    assert [f[frequency] for f in selection.candidate_features(rating, "a review", kind, 5, profile=kind)] == \
        [0.6, 0.6, 0.6, 0.2, 0.2]
    assert all(f[profile] == f[frequency] == 0.0
               for f in selection.candidate_features(rating, "a review", ["4", "5"], 2))
    # a tag's and a tweet's profile stay out of the features: their column is 0
    assert all(f[profile] == 0.0 for f in selection.candidate_features(MOVIES, "a film", ["comedy", "drama"], 2,
                                                                         profile=["comedy", "comedy"]))
    assert all(f[profile] == 0.0 for f in selection.candidate_features(LAMP7, QUERY, CANDIDATES,
                                                                         profile=[CANDIDATES[0]]))


def test_features_describe_each_candidate_without_the_gold():
    feats = selection.candidate_features(LAMP7, QUERY, CANDIDATES)
    assert len(feats) == 4 and all(len(f) == len(selection.FEATURES) for f in feats)
    assert [f[3] for f in feats] == [1.0, 0.0, 0.0, 0.0]  # only the greedy answer is flagged
    closeness = [f[0] for f in feats]
    assert closeness.index(max(closeness)) == selection.closest(LAMP7, QUERY, CANDIDATES)
    assert feats[3][2] < 0 < feats[0][2] + 1  # "happy weekend" is much shorter than the query


def test_training_free_rules_and_the_oracle():
    assert selection.oracle(LAMP7, CANDIDATES, GOLD) == 1
    assert selection.closest(LAMP7, QUERY, CANDIDATES) in (0, 1)
    assert selection.closest(MOVIES, "a film", ["comedy", "romance"]) == 0  # classification: greedy
    assert selection.mbr(LAMP7, QUERY, ["a b c", "a b c", "x y z"]) == 0  # ties go to the earlier candidate


def test_the_rules_picks_are_features_so_the_adapter_can_learn_either_rule():
    near, voted = selection.FEATURES.index("closest"), selection.FEATURES.index("consensus")
    for task, query, texts in ((LAMP7, QUERY, CANDIDATES), (LAMP7, "x y z", ["a b c", "a b c", "x y z"]),
                               (MOVIES, "a film", ["romance", "comedy", "Comedy!"])):
        feats = selection.candidate_features(task, query, texts)
        assert [f[near] for f in feats] == [float(j == selection.closest(task, query, texts)) for j in range(len(texts))]
        assert [f[voted] for f in feats] == [float(j == selection.mbr(task, query, texts)) for j in range(len(texts))]
    assert selection.mbr(MOVIES, "a film", ["romance", "comedy", "Comedy!"]) == 1
    assert selection.closest(LAMP7, "x y z", ["a b c", "a b c", "x y z"]) == 2
    # labels added after the LLM's answers are never a rule's pick
    texts = selection.with_labels(MOVIES, ["romance"])
    assert sum(f[near] + f[voted] for f in selection.candidate_features(MOVIES, "a film", texts, sampled=1)[1:]) == 0


def test_pick_keeps_greedy_unless_a_candidate_beats_it_by_more_than_the_margin():
    scores = [0.0, 0.3, 0.1]
    assert selection.pick(scores, 0.0) == 1
    assert selection.pick(scores, 0.25) == 1
    assert selection.pick(scores, 0.3) == 0
    assert selection.pick(scores, None) == 0  # off
    assert selection.pick([0.2, 0.2], 0.0) == 0  # a tie keeps greedy


def test_a_rating_answers_the_least_expected_error_under_the_adapters_softmax():
    rating = get_task("LaMP_3")
    texts = ["5", "1", "2"]
    scores = [math.log(0.4), math.log(0.3), math.log(0.3)]  # "5" scores top, but 60% of the mass sits at 1-2
    values = selection.decision_values(rating, texts, "median")
    assert values == [5, 1, 2]
    # expected |error|: "5" 0.3*4 + 0.3*3 = 2.1, "1" 0.4*4 + 0.3*1 = 1.9, "2" 0.4*3 + 0.3*1 = 1.5
    assert selection.pick(scores, 0.0, values) == 2
    assert selection.pick(scores, 5.0, values) == 2  # the margin does not apply to the expected error...
    assert selection.pick(scores, None, values) == 0  # ...but off still keeps greedy
    assert selection.pick(scores, 0.0, selection.decision_values(rating, texts, "top")) == 0  # HYDRA: top score
    # repeated candidates add their mass; a candidate without a number is never chosen
    repeated = selection.decision_values(rating, ["4", "5", "5", "n/a"], "median")
    assert selection.pick([0.0, 0.0, 0.0, 3.0], 0.0, repeated) == 1
    assert selection.decision_values(MOVIES, ["comedy", "romance"], "median") is None


def test_margin_is_picked_from_additive_sums():
    # query 1: greedy 0.2, best sample (+0.4 log-odds) 0.6; query 2: greedy 0.5, best sample (+0.2) 0.1
    q1 = selection.margin_sums([0.0, 0.4], [0.2, 0.6])
    q2 = selection.margin_sums([0.0, 0.2], [0.5, 0.1])
    total = selection.add_sums(q1, q2)
    assert total["queries"] == 2 and total["margin:off"] == pytest.approx(0.7)
    choice = selection.pick_margin(total)
    # margins 0 and 0.1 switch on both (0.6 + 0.1), 0.25 only on query 1 (0.6 + 0.5), 0.5 and up on neither
    assert choice["mean"]["0.25"] == pytest.approx(0.55) and choice["margin"] == 0.25
    assert selection.pick_margin({})["margin"] == "off"


def test_margin_ties_go_to_the_adapters_own_choice_and_held_out_losses_raise_it():
    tie = selection.margin_sums([0.0, 1.0], [0.5, 0.5])  # the adapter's pick grades like greedy
    assert selection.pick_margin(tie)["margin"] == 0.0
    worse = selection.margin_sums([0.0, 1.0], [0.5, 0.4])  # switching away from greedy (gap 1.0) hurt
    assert selection.pick_margin(worse)["margin"] == 1.0  # the smallest margin that keeps greedy here
    hurt_twice = selection.add_sums(worse, selection.margin_sums([0.0, 9.0], [0.5, 0.1]))
    assert selection.pick_margin(hurt_twice)["margin"] == "off"  # no margin in the grid keeps greedy on both


def test_closed_label_tasks_add_the_labels_the_llm_did_not_name_with_its_votes_as_a_feature():
    sampled = ["comedy", "Comedy!", "romance"]  # the greedy answer and two samples
    texts = selection.with_labels(MOVIES, sampled)
    assert texts[:3] == sampled and len(texts) == 3 + len(MOVIES.labels) - 2
    assert "comedy" not in texts[3:] and "romance" not in texts[3:] and "sci-fi" in texts[3:]
    feats = selection.candidate_features(MOVIES, "a film", texts, sampled=3)
    assert [f[1] for f in feats[:3]] == [0.5, 0.5, 0.0]  # agreement with the other LLM answers
    assert all(f[1] == 0.0 and f[3] == 0.0 for f in feats[3:])  # no LLM answer names an added label
    assert selection.with_labels(LAMP7, CANDIDATES) == CANDIDATES  # generation: the candidates as they are
    label_set = selection.candidate_features(MOVIES, "a film", list(MOVIES.labels), sampled=0)
    assert all(f == [0.0] * len(selection.FEATURES) for f in label_set)  # no LLM answer, no history


def test_history_feature_is_the_share_of_the_users_retrieved_items_that_agree():
    history = selection.FEATURES.index("history")
    texts = ["comedy", "romance", "sci-fi"]
    feats = selection.candidate_features(MOVIES, "a film", texts, sampled=1, history=["romance", "Romance", "comedy"])
    assert [f[history] for f in feats] == pytest.approx([1 / 3, 2 / 3, 0.0])
    tweets = selection.candidate_features(LAMP7, QUERY, CANDIDATES, history=[CANDIDATES[1]])
    assert max(range(4), key=lambda j: tweets[j][history]) == 1  # generation: ROUGE mix with the user's texts

