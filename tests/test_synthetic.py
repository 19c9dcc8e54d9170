"""The synthetic LaMP-format data: deterministic, valid LaMP files, and users that truly differ."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import pytest

from fedhydra.common.data import load_split
from fedhydra.common.synthetic import make_synthetic, write_synthetic


def _as_plain(data) -> list[tuple]:
    return [(u.id, u.input, u.profile, u.gold) for u in data.users]


@pytest.mark.parametrize("task", ["LaMP_2M", "LaMP_7"])
def test_same_seed_same_bytes_other_seed_differs(tmp_path, task):
    a = write_synthetic(tmp_path / "a", task=task, n_users=12, seed=5)
    b = write_synthetic(tmp_path / "b", task=task, n_users=12, seed=5)
    c = write_synthetic(tmp_path / "c", task=task, n_users=12, seed=6)
    assert [p.name for p in a] == ["dev_questions.json", "dev_outputs.json", "README.md"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[0].read_bytes() != c[0].read_bytes()
    assert _as_plain(make_synthetic(task, 12, seed=5)) == _as_plain(make_synthetic(task, 12, seed=5))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["README.md", "dev_outputs.json",
                                                                  "dev_questions.json"]  # no temp files


@pytest.mark.parametrize("task", ["LaMP_2M", "LaMP_7"])
def test_written_files_pass_the_loader_and_match_memory(tmp_path, task):
    write_synthetic(tmp_path, task=task, n_users=9, seed=2)
    loaded = load_split(tmp_path)
    assert loaded.task.name == task
    assert _as_plain(loaded) == _as_plain(make_synthetic(task, 9, seed=2))
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("SYNTHETIC data, not real LaMP data")
    assert f"--task {task} --users 9 --seed 2" in readme


def test_movie_users_follow_private_topic_to_tag_maps():
    data = make_synthetic("LaMP_2M", n_users=40, seed=0, profile_size=(12, 20))
    meta, labels = data.meta, set(data.task.labels)
    tags_per_topic = collections.defaultdict(set)
    for user in data.users:
        tag_of = meta["user_tags"][user.id]
        topics = meta["item_topics"][user.id]
        assert 12 <= len(user.profile) <= 20
        for item in user.profile:  # the map holds between profile and gold
            assert item["tag"] == tag_of[topics[item["id"]]]
        query_topic = meta["query_topics"][user.id]
        assert user.gold == tag_of[query_topic] and user.gold in labels
        assert sum(t == query_topic for t in topics.values()) >= 2  # history shows the user's tag
        assert data.task.content(user.input) not in {i["description"] for i in user.profile}
        for topic, tag in tag_of.items():
            tags_per_topic[topic].add(tag)
    # Users differ: every topic gets at least 2 different tags across users.
    assert all(len(tags) >= 2 for tags in tags_per_topic.values()), tags_per_topic
    assert set().union(*tags_per_topic.values()) == labels  # all 15 LaMP tags are in use


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def test_movie_history_predicts_gold_but_population_does_not():
    """Personalization matters: the user's most similar history item usually carries the gold tag,
    while the tag most users give the query's topic is right far less often."""
    data = make_synthetic("LaMP_2M", n_users=60, seed=1)
    by_topic = collections.defaultdict(collections.Counter)
    for u in data.users:
        by_topic[data.meta["query_topics"][u.id]][u.gold] += 1
    population = sum(by_topic[data.meta["query_topics"][u.id]].most_common(1)[0][0] == u.gold for u in data.users)
    nearest = 0
    for u in data.users:
        query = _words(data.task.content(u.input))
        best = max(u.profile, key=lambda i: len(query & _words(i["description"])) / len(query | _words(i["description"])))
        nearest += best["tag"] == u.gold
    assert nearest / len(data.users) >= 0.8
    assert population / len(data.users) <= 0.65


def test_tweet_users_write_in_distinct_consistent_styles():
    data = make_synthetic("LaMP_7", n_users=40, seed=0)
    styles = data.meta["styles"]
    assert len({tuple(sorted(s.items())) for s in styles.values()}) == 40
    assert len({s["signature"] for s in styles.values()}) >= 4
    assert len({s["case"] for s in styles.values()}) >= 3
    for user in data.users:
        style = styles[user.id]
        texts = [i["text"] for i in user.profile] + [user.gold]
        for text in texts:
            if style["signature"]:
                assert text.endswith(" " + style["signature"])
            if style["case"] == "lower":
                assert text == text.lower()
            if style["case"] == "upper":
                assert text.split(" ")[:-1] == [w.upper() for w in text.split(" ")[:-1]]
            if style["filler"].startswith(" "):
                assert style["filler"].strip() in text.lower()
        neutral = data.task.content(user.input)
        assert neutral[0].isupper() and neutral[-1] in ".?" and neutral != user.gold
        assert user.gold not in {i["text"] for i in user.profile}


def test_same_neutral_tweet_comes_out_differently_for_different_users():
    data = make_synthetic("LaMP_7", n_users=40, seed=3)
    by_casual = collections.defaultdict(list)
    for user in data.users:
        by_casual[data.meta["query_casual"][user.id]].append(user.gold)
    shared = [golds for golds in by_casual.values() if len(golds) > 1]
    assert len(shared) >= 3, "expected several query tweets shared by users"
    assert all(len(set(golds)) == len(golds) for golds in shared), shared


def test_unsupported_arguments_are_refused():
    with pytest.raises(ValueError, match=r"synthetic data exists for LaMP_2M, LaMP_7, not 'LaMP_4'"):
        make_synthetic("LaMP_4")
    with pytest.raises(ValueError, match=r"profile_size"):
        make_synthetic("LaMP_2M", profile_size=(5, 3))
    with pytest.raises(ValueError, match=r"n_users must be at least 1"):
        make_synthetic("LaMP_7", n_users=0)


def test_cli_synth_writes_loadable_files(tmp_path: Path, capsys):
    from fedhydra.cli.main import main

    assert main(["data", "synth", "--dest", str(tmp_path), "--users", "6", "--seed", "4"]) == 0
    assert f"wrote {tmp_path / 'dev_questions.json'}" in capsys.readouterr().out
    assert len(load_split(tmp_path).users) == 6
    assert main(["data", "synth", "--dest", str(tmp_path / "x"), "--task", "LaMP_5"]) == 2
