"""Per-user BM25: agrees with a fresh rank_bm25.BM25Okapi, excludes a pseudo-query's own item, builds once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from fedhydra.common.records import User
from fedhydra.common.retrieval import Retriever, UserIndex, tokenize
from fedhydra.common.tasks import get_task

TWEETS = get_task("LaMP_7")
LAMP7 = Path(__file__).resolve().parents[2] / "shared/data/lamp/LaMP_7"

PROFILE = [
    {"id": "a", "text": "I love Paris in the spring"},
    {"id": "b", "text": "Paris, France is lovely!"},
    {"id": "c", "text": "Coffee is my morning fuel"},
    {"id": "d", "text": "Morning runs in the park"},
    {"id": "e", "text": "coffee and paris: the perfect morning"},
]


def fresh_ranking(task, profile, query, k, exclude=()):
    """The reference: a new BM25Okapi on the same tokens, best score first, ties in profile order."""
    bm25 = BM25Okapi([tokenize(task.item_text(item)) for item in profile])
    scores = bm25.get_scores(tokenize(query))
    order = sorted((i for i, item in enumerate(profile) if item["id"] not in exclude), key=lambda i: (-scores[i], i))
    return [profile[i]["id"] for i in order[:k]], scores


def ids(items):
    return [item["id"] for item in items]


def load_lamp7_users(limit: int) -> list[User]:
    questions = LAMP7 / "dev_questions.json"
    if not questions.exists():
        pytest.skip(f"real LaMP-7 data not found at {LAMP7} (expected beside the checkout in shared/data/lamp)")
    with open(questions, encoding="utf-8") as f:
        rows = json.load(f)
    return [User(id=str(r["id"]), input=r["input"], profile=r["profile"]) for r in rows[:limit]]


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("Paris, France!") == ["paris", "france"]
    assert tokenize("paris") == tokenize("PARIS,")
    assert tokenize("Café @user #tag") == ["café", "user", "tag"]
    assert tokenize("") == [] and tokenize(" ... ") == []


def test_hand_made_profile_matches_fresh_bm25():
    index = UserIndex(TWEETS, PROFILE, user_id="u1")
    for query in ["coffee", "Paris in the morning", "park runs", "nothing matches here", "the the paris"]:
        expected, scores = fresh_ranking(TWEETS, PROFILE, query, k=5)
        assert np.array_equal(index.scores(query), scores), query
        assert ids(index.top(query, 5)) == expected, query
    # by hand: "coffee" is in c (5 tokens) and e (6 tokens); the shorter scores higher; the rest tie at 0
    assert ids(index.top("Coffee!", 5)) == ["c", "e", "a", "b", "d"]
    assert ids(index.top("coffee", 2)) == ["c", "e"]


def test_exclusion_never_returns_the_query_item():
    index = UserIndex(TWEETS, PROFILE)
    query = PROFILE[1]["text"]
    assert ids(index.top(query, 1)) == ["b"]  # its own text ranks it first
    assert "b" not in ids(index.top(query, 5, exclude_ids={"b"}))
    assert len(index.top(query, 5, exclude_ids={"b"})) == 4
    for item in PROFILE:
        got = ids(index.top_for_item(item, 10))
        assert item["id"] not in got and len(got) == len(PROFILE) - 1
        assert got == fresh_ranking(TWEETS, PROFILE, item["text"], 10, exclude={item["id"]})[0]
    assert ids(index.top("paris", 5, exclude_ids=[x["id"] for x in PROFILE])) == []


def test_k_larger_than_profile_zero_and_negative():
    index = UserIndex(TWEETS, PROFILE)
    assert len(index.top("paris", 100)) == len(PROFILE)
    assert index.top("paris", 0) == []
    with pytest.raises(ValueError, match="non-negative integer"):
        index.top("paris", -1)


def test_empty_query_returns_profile_order_with_zero_scores():
    index = UserIndex(TWEETS, PROFILE)
    for query in ["", "   ", "?!"]:
        assert not index.scores(query).any()
        assert ids(index.top(query, 3)) == ["a", "b", "c"]
    ranked = index.ranked("", 2)
    assert [score for _, score in ranked] == [0.0, 0.0]


def test_other_task_fields_are_indexed():
    movies = get_task("LaMP_2M")
    profile = [
        {"id": "1", "description": "A space crew fights aliens", "tag": "sci-fi"},
        {"id": "2", "description": "Two friends on a road trip laugh a lot", "tag": "comedy"},
        {"id": "3", "description": "A ship sails to space", "tag": "sci-fi"},
    ]
    assert ids(UserIndex(movies, profile).top("aliens in space", 2)) == ["1", "3"]


def test_bad_profiles_and_ids_are_refused():
    with pytest.raises(ValueError, match="appears twice"):
        UserIndex(TWEETS, [PROFILE[0], dict(PROFILE[0])], user_id="u9")
    with pytest.raises(ValueError, match="lacks field 'text'"):
        UserIndex(TWEETS, [{"id": "x", "tweet": "hi"}])
    with pytest.raises(ValueError, match="has no 'id'"):
        UserIndex(TWEETS, [{"text": "hi"}])
    with pytest.raises(ValueError, match="cannot exclude id 'zz'"):
        UserIndex(TWEETS, PROFILE).top("paris", 3, exclude_ids=["zz"])
    with pytest.raises(ValueError, match="not the string"):
        UserIndex(TWEETS, PROFILE).top("paris", 3, exclude_ids="a")


def test_empty_and_tiny_profiles():
    empty = UserIndex(TWEETS, [])
    assert empty.top("paris", 4) == [] and len(empty.scores("paris")) == 0
    no_words = UserIndex(TWEETS, [{"id": "1", "text": "!!!"}, {"id": "2", "text": ""}])
    assert ids(no_words.top("paris", 4)) == ["1", "2"]
    one = UserIndex(TWEETS, [PROFILE[0]])
    assert one.top_for_item(PROFILE[0], 4) == []
    assert ids(one.top("paris", 4)) == ["a"]


def test_retriever_builds_each_index_once():
    users = [User(id=f"u{i}", input=TWEETS.instruction(f"my morning fuel: coffee {i}"), profile=PROFILE) for i in range(3)]
    retriever = Retriever(TWEETS)
    for _ in range(50):
        for user in users:
            assert ids(retriever.top_for_input(user, 2)) == ["c", "e"]
            retriever.top(user, "morning park", 3, exclude_ids=("d",))
            retriever.top_for_item(user, PROFILE[0], 3)
    assert retriever.built == 3 and len(retriever) == 3 and "u1" in retriever
    assert retriever.index(users[0]) is retriever.index(users[0])
    impostor = User(id="u0", input=users[0].input, profile=PROFILE[:2])
    with pytest.raises(ValueError, match="share the id"):
        retriever.index(impostor)


def test_real_lamp7_users_match_fresh_bm25():
    users = load_lamp7_users(60)
    retriever = Retriever(TWEETS)
    for user in users:
        queries = [(TWEETS.content(user.input), ())]
        queries += [(TWEETS.item_text(item), (item["id"],)) for item in user.profile[:4]]
        for query, exclude in queries:
            expected, scores = fresh_ranking(TWEETS, user.profile, query, 10, exclude)
            index = retriever.index(user)
            assert np.array_equal(index.scores(query), scores), (user.id, query)
            got = ids(retriever.top(user, query, 10, exclude_ids=exclude))
            assert got == expected, (user.id, query)
            assert not set(exclude) & set(got)
    assert retriever.built == len(users)


def test_numpy_path_for_heavy_queries_matches_fresh_bm25():
    import random

    rng = random.Random(3)
    words = [f"w{i}" for i in range(60)]
    profile = [{"id": str(i), "text": " ".join(rng.choices(words, k=rng.randint(0, 30)))} for i in range(400)]
    index = UserIndex(TWEETS, profile)
    queries = [" ".join(rng.choices(words, k=40)), "w1 w1 w2 unknown", "", profile[5]["text"]]
    for threshold in (index.numpy_from_postings, 0):  # the default picks NumPy for the long query; 0 forces it
        index.numpy_from_postings = threshold
        for query in queries:
            expected, scores = fresh_ranking(TWEETS, profile, query, 25, exclude={"5"})
            assert np.array_equal(index.scores(query), scores), (threshold, query[:20])
            assert ids(index.top(query, 25, exclude_ids={"5"})) == expected, (threshold, query[:20])
