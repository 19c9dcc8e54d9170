"""LaMP loading and validation: real LaMP-7 data loads, malformed files are refused with a
one-line message naming file, item and problem, nothing is ever written, and the CLI says so."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedhydra.common.data import load_split, more_users, split_users, validate_path
from fedhydra.common.records import DataError, User
from fedhydra.common.tasks import get_task

LAMP7 = Path(__file__).resolve().parents[2] / "shared/data/lamp/LaMP_7"
FEDHYDRA = Path(sys.executable).parent / "fedhydra"
MOVIE = get_task("LaMP_2M")


def _movie_questions() -> list[dict]:
    return [
        {"id": "u1", "input": MOVIE.instruction("A robot learns to love."),
         "profile": [{"id": "p1", "description": "Aliens invade Mars.", "tag": "sci-fi"},
                     {"id": "p2", "description": "A detective hunts a killer.", "tag": "twist ending"}]},
        {"id": "u2", "input": MOVIE.instruction("Two rivals fall in love in Paris."),
         "profile": [{"id": "p1", "description": "A wedding goes wrong.", "tag": "comedy"},
                     {"id": "p2", "description": "Lovers meet again.", "tag": "romance"}]},
    ]


def _movie_outputs() -> dict:
    return {"task": "LaMP_2", "golds": [{"id": "u1", "output": "sci-fi"}, {"id": "u2", "output": "romance"}]}


def _write(folder: Path, questions, outputs, split: str = "dev") -> Path:
    """Write a split; `questions`/`outputs` are JSON values, or str for raw text, or None to omit."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in ((f"{split}_questions.json", questions), (f"{split}_outputs.json", outputs)):
        if value is not None:
            text = value if isinstance(value, str) else json.dumps(value)
            (folder / name).write_text(text, encoding="utf-8")
    return folder


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime: proof that loading wrote nothing."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def test_valid_movie_split_loads_with_lamp2_read_as_movie_tagging(tmp_path):
    data = load_split(_write(tmp_path / "d", _movie_questions(), _movie_outputs()))
    assert data.task.name == "LaMP_2M"
    assert [u.id for u in data.users] == ["u1", "u2"]
    assert [u.gold for u in data.users] == ["sci-fi", "romance"]
    assert data.users[0].profile[1]["tag"] == "twist ending"
    assert data.meta["split"] == "dev" and data.meta["lamp_task"] == "LaMP_2"


def test_questions_file_path_and_outputs_path_both_work(tmp_path):
    folder = _write(tmp_path / "d", _movie_questions(), _movie_outputs())
    assert len(load_split(folder / "dev_questions.json").users) == 2
    assert len(load_split(folder / "dev_outputs.json").users) == 2


def test_lamp2_news_task_is_taken_from_task_argument(tmp_path):
    news = get_task("LaMP_2N")
    questions = [{"id": "n1", "input": news.instruction("The senate passed a bill."),
                  "profile": [{"id": "a", "text": "Elections are near.", "category": "politics"}]}]
    outputs = {"task": "LaMP_2", "golds": [{"id": "n1", "output": "politics"}]}
    folder = _write(tmp_path / "n", questions, outputs)
    assert load_split(folder, task="LaMP_2N").task.name == "LaMP_2N"
    with pytest.raises(DataError, match=r"item 0 \(id n1\): \"input\" does not contain LaMP_2M's marker "
                                         r"'description:' \(read as LaMP_2M; for news categorization give --task LaMP_2N\)"):
        load_split(folder)  # LaMP_2 reads as movie tagging by default


def test_test_split_without_outputs_needs_task_and_gives_no_golds(tmp_path):
    folder = _write(tmp_path / "t", _movie_questions(), None, split="test")
    data = load_split(folder, task="LaMP_2M", require_golds=False)
    assert [u.gold for u in data.users] == [None, None]
    with pytest.raises(DataError, match=r"test_questions\.json: no outputs file \(test_outputs\.json\) to read "
                                         r"the task from; give the task"):
        load_split(folder, require_golds=False)
    with pytest.raises(DataError, match=r"test_outputs\.json: file not found"):
        load_split(folder, task="LaMP_2M")


def test_rating_scores_may_be_digit_strings_or_integers(tmp_path):
    rating = get_task("LaMP_3")
    questions = [{"id": "r1", "input": rating.instruction("Great blender."),
                  "profile": [{"id": "a", "text": "Broke fast.", "score": "1"}, {"id": "b", "text": "Fine.", "score": 4}]}]
    folder = _write(tmp_path / "r", questions, {"task": "LaMP_3", "golds": [{"id": "r1", "output": "5"}]})
    assert load_split(folder).users[0].gold == "5"
    questions[0]["profile"][1]["score"] = "7"
    _write(folder, questions, None)
    with pytest.raises(DataError, match=r"item 0 \(id r1\): profile item 1 \(id b\): \"score\" must be one of"):
        load_split(folder)


# (name, change to (questions, outputs), file the message must start with, expected message part)
MALFORMED = [
    ("questions not JSON", lambda q, o: ('[{"id": "u1",\n  "input" "x"}]', o), "dev_questions.json",
     r"not valid JSON: Expecting ':' delimiter at line 2 column 11"),
    ("questions not UTF-8", lambda q, o: (b"\xff\xfe[]", o), "dev_questions.json", r"not UTF-8 text"),
    ("top level not a list", lambda q, o: ({"questions": q}, o), "dev_questions.json",
     r"expected a list of questions, got an object"),
    ("no questions", lambda q, o: ([], o), "dev_questions.json", r"no questions in the file"),
    ("item not an object", lambda q, o: ([q[0], "u2"], o), "dev_questions.json",
     r"item 1: expected an object, got a string \"u2\""),
    ("missing id", lambda q, o: ([q[0], {k: v for k, v in q[1].items() if k != "id"}], o), "dev_questions.json",
     r"item 1: missing \"id\""),
    ("id not a string", lambda q, o: ([q[0], {**q[1], "id": 2}], o), "dev_questions.json",
     r"item 1: \"id\" must be a string, got a number 2"),
    ("missing input", lambda q, o: ([q[0], {"id": "u2", "profile": q[1]["profile"]}], o), "dev_questions.json",
     r"item 1 \(id u2\): missing \"input\""),
    ("missing profile", lambda q, o: ([q[0], {"id": "u2", "input": q[1]["input"]}], o), "dev_questions.json",
     r"item 1 \(id u2\): missing \"profile\""),
    ("input not a string", lambda q, o: ([q[0], {**q[1], "input": ["x"]}], o), "dev_questions.json",
     r"item 1 \(id u2\): \"input\" must be a string, got a list"),
    ("empty input", lambda q, o: ([q[0], {**q[1], "input": "  "}], o), "dev_questions.json",
     r"item 1 \(id u2\): \"input\" is empty"),
    ("input without marker", lambda q, o: ([q[0], {**q[1], "input": "Tag this movie: robots"}], o),
     "dev_questions.json", r"item 1 \(id u2\): \"input\" does not contain LaMP_2M's marker 'description:'"),
    ("input without content", lambda q, o: ([q[0], {**q[1], "input": MOVIE.instruction("")}], o),
     "dev_questions.json", r"item 1 \(id u2\): \"input\" has no content after 'description:'"),
    ("profile not a list", lambda q, o: ([q[0], {**q[1], "profile": {"id": "p1"}}], o), "dev_questions.json",
     r"item 1 \(id u2\): \"profile\" must be a list, got an object"),
    ("empty profile", lambda q, o: ([q[0], {**q[1], "profile": []}], o), "dev_questions.json",
     r"item 1 \(id u2\): \"profile\" is empty"),
    ("profile item not an object", lambda q, o: ([q[0], {**q[1], "profile": [q[1]["profile"][0], 3]}], o),
     "dev_questions.json", r"item 1 \(id u2\): profile item 1: expected an object, got a number 3"),
    ("profile item missing id", lambda q, o: ([q[0], {**q[1], "profile": [{"description": "d", "tag": "comedy"}]}], o),
     "dev_questions.json", r"item 1 \(id u2\): profile item 0: missing \"id\""),
    ("profile item missing task field", lambda q, o: ([q[0], {**q[1], "profile": [{"id": "p9", "description": "d"}]}], o),
     "dev_questions.json", r"item 1 \(id u2\): profile item 0 \(id p9\): missing \"tag\" \(LaMP_2M profile items need"),
    ("profile field wrong type", lambda q, o: ([q[0], {**q[1], "profile": [{"id": "p9", "description": 5, "tag": "x"}]}], o),
     "dev_questions.json", r"item 1 \(id u2\): profile item 0 \(id p9\): \"description\" must be a string, got a number 5"),
    ("duplicate profile ids", lambda q, o: ([q[0], {**q[1], "profile": [q[1]["profile"][0]] * 2}], o),
     "dev_questions.json", r"item 1 \(id u2\): profile item 1 \(id p1\): duplicate profile id \(first at profile item 0\)"),
    ("duplicate question ids", lambda q, o: ([q[0], {**q[1], "id": "u1"}], o), "dev_questions.json",
     r"item 1 \(id u1\): duplicate question id \(first at item 0\)"),
    ("outputs not JSON", lambda q, o: (q, "{"), "dev_outputs.json", r"not valid JSON: .* at line 1 column 2"),
    ("outputs not an object", lambda q, o: (q, o["golds"]), "dev_outputs.json",
     r"expected an object with \"golds\", got a list"),
    ("outputs without golds", lambda q, o: (q, {"task": "LaMP_2"}), "dev_outputs.json", r"missing \"golds\""),
    ("golds not a list", lambda q, o: (q, {"task": "LaMP_2", "golds": {"u1": "x"}}), "dev_outputs.json",
     r"\"golds\" must be a list, got an object"),
    ("outputs task unknown", lambda q, o: (q, {**o, "task": "LaMP_9"}), "dev_outputs.json",
     r"unknown task 'LaMP_9'"),
    ("no task anywhere", lambda q, o: (q, {"golds": o["golds"]}), "dev_outputs.json",
     r"no \"task\" field to read the task from; give the task"),
    ("gold not an object", lambda q, o: (q, {**o, "golds": [o["golds"][0], ["u2", "x"]]}), "dev_outputs.json",
     r"gold 1: expected an object, got a list"),
    ("gold missing output", lambda q, o: (q, {**o, "golds": [o["golds"][0], {"id": "u2"}]}), "dev_outputs.json",
     r"gold 1: missing \"output\""),
    ("gold missing id", lambda q, o: (q, {**o, "golds": [o["golds"][0], {"output": "x"}]}), "dev_outputs.json",
     r"gold 1: missing \"id\""),
    ("gold id not a string", lambda q, o: (q, {**o, "golds": [o["golds"][0], {"id": 2, "output": "x"}]}),
     "dev_outputs.json", r"gold 1: \"id\" must be a string, got a number 2"),
    ("gold output wrong type", lambda q, o: (q, {**o, "golds": [o["golds"][0], {"id": "u2", "output": None}]}),
     "dev_outputs.json", r"gold 1 \(id u2\): \"output\" must be a string, got null"),
    ("duplicate gold ids", lambda q, o: (q, {**o, "golds": o["golds"] + [o["golds"][0]]}), "dev_outputs.json",
     r"gold 2 \(id u1\): duplicate gold id \(first at gold 0\)"),
    ("gold for unknown question", lambda q, o: (q, {**o, "golds": o["golds"] + [{"id": "zz", "output": "x"}]}),
     "dev_outputs.json", r"gold 2 \(id zz\): no question with this id in dev_questions\.json"),
    ("question without gold", lambda q, o: (q, {**o, "golds": o["golds"][:1]}), "dev_questions.json",
     r"item 1 \(id u2\): no gold in dev_outputs\.json"),
    ("outputs file missing", lambda q, o: (q, None), "dev_outputs.json", r"file not found"),
]


@pytest.mark.parametrize("change,file_name,message", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_split_is_refused_with_one_line_naming_file_item_and_problem(tmp_path, change, file_name, message):
    questions, outputs = change(copy.deepcopy(_movie_questions()), copy.deepcopy(_movie_outputs()))
    folder = tmp_path / "d"
    folder.mkdir()
    for name, value in (("dev_questions.json", questions), ("dev_outputs.json", outputs)):
        if isinstance(value, bytes):
            (folder / name).write_bytes(value)
        elif value is not None:
            (folder / name).write_text(value if isinstance(value, str) else json.dumps(value), encoding="utf-8")
    before = _snapshot(tmp_path)
    with pytest.raises(DataError) as caught:
        load_split(folder)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(str(folder / file_name) + ": "), text
    assert re.search(message, text), text
    assert _snapshot(tmp_path) == before  # nothing written, renamed or deleted


def test_task_argument_disagreeing_with_outputs_task_is_refused(tmp_path):
    folder = _write(tmp_path / "d", _movie_questions(), _movie_outputs())
    with pytest.raises(DataError, match=r"dev_outputs\.json: file is for task 'LaMP_2' but task 'LaMP_7' was asked for"):
        load_split(folder, task="LaMP_7")
    with pytest.raises(DataError, match=r"unknown task 'LaMP_9'; known tasks: LaMP_1"):
        load_split(folder, task="LaMP_9")


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: file not found"):
        load_split(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no \*_questions\.json file in this folder"):
        load_split(tmp_path / "empty")
    _write(tmp_path / "two", _movie_questions(), _movie_outputs(), split="dev")
    _write(tmp_path / "two", _movie_questions(), _movie_outputs(), split="train")
    with pytest.raises(DataError, match=r"several question files \(dev_questions\.json, train_questions\.json\)"):
        load_split(tmp_path / "two")


@pytest.mark.lamp
def test_real_lamp7_dev_loads():
    if not (LAMP7 / "dev_questions.json").exists():
        pytest.skip(f"real LaMP-7 data not found at {LAMP7}")
    data = load_split(LAMP7)
    assert data.task.name == "LaMP_7"
    assert len(data.users) == 1000 and len({u.id for u in data.users}) == 1000
    assert all(u.gold for u in data.users)
    assert min(len(u.profile) for u in data.users) >= 1
    assert data.users[0].input.startswith("Paraphrase the following tweet")


def _cli(*args: str) -> subprocess.CompletedProcess:
    assert FEDHYDRA.exists(), f"console script missing: {FEDHYDRA} (run make setup)"
    return subprocess.run([str(FEDHYDRA), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_cli_validate_prints_one_line_and_exit_2_on_malformed_file(tmp_path):
    questions = _movie_questions()
    del questions[1]["profile"][0]["tag"]
    folder = _write(tmp_path / "bad", questions, _movie_outputs())
    result = _cli("data", "validate", str(folder))
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "dev_questions.json: item 1 (id u2): profile item 0 (id p1): missing \"tag\"" in lines[0]


@pytest.mark.lamp
def test_cli_validate_summarizes_real_lamp7():
    if not (LAMP7 / "dev_questions.json").exists():
        pytest.skip(f"real LaMP-7 data not found at {LAMP7}")
    result = _cli("data", "validate", str(LAMP7))
    assert result.returncode == 0, result.stderr
    assert "LaMP_7" in result.stdout and "1000 users" in result.stdout and "golds 1000/1000" in result.stdout
    assert "min 9 / median 13 / max 169" in result.stdout


def test_validate_path_summary_counts_missing_golds(tmp_path):
    folder = _write(tmp_path / "t", _movie_questions(), None, split="test")
    line = validate_path(folder, task="LaMP_2M")
    assert "LaMP_2M" in line and "split test" in line and "2 users" in line and "golds 0/2" in line
    assert "\n" not in line


def _users(n: int) -> list[User]:
    return [User(id=f"u{i}", input="x", profile=[{"id": "a"}]) for i in range(n)]


def test_split_users_disjoint_deterministic_and_seeded():
    users = _users(30)
    train, test = split_users(users, 10, 5, seed=3)
    assert len(train) == 10 and len(test) == 5
    assert not {u.id for u in train} & {u.id for u in test}
    again = split_users(users, 10, 5, seed=3)
    assert [u.id for u in again[0]] == [u.id for u in train] and [u.id for u in again[1]] == [u.id for u in test]
    other = split_users(users, 10, 5, seed=4)
    assert [u.id for u in other[0]] != [u.id for u in train]


def test_split_users_refuses_too_few_users_and_duplicates():
    with pytest.raises(ValueError, match=r"asked for 20 training \+ 15 test users but only 30 users exist"):
        split_users(_users(30), 20, 15, seed=0)
    with pytest.raises(ValueError, match=r"duplicate ids"):
        split_users(_users(3) + _users(1), 1, 1, seed=0)
    with pytest.raises(ValueError, match=r"must not be negative"):
        split_users(_users(3), -1, 1, seed=0)


def test_more_users_come_from_outside_the_split_and_never_change_it():
    users = _users(30)
    train, test = split_users(users, 10, 5, seed=3)
    more = more_users(users, train + test, 12, seed=3)
    taken = {u.id for u in train + test}
    assert len(more) == 12 == len({u.id for u in more}) and not {u.id for u in more} & taken
    assert [u.id for u in more_users(users, train + test, 12, seed=3)] == [u.id for u in more]
    assert [u.id for u in more_users(users, train + test, 12, seed=4)] != [u.id for u in more]
    assert split_users(users, 10, 5, seed=3) == (train, test)  # asking for more users leaves the split alone
    assert more_users(users, train + test, 0, seed=3) == []
    with pytest.raises(ValueError, match=r"asked for 16 more users but only 15"):
        more_users(users, train + test, 16, seed=3)
    with pytest.raises(ValueError, match=r"must not be negative"):
        more_users(users, train, -1, seed=3)


def test_the_profile_size_partitioner_groups_users_of_similar_history_length():
    from fedhydra.common.partition import partition_users
    from fedhydra.common.records import User

    sizes = {"a": 9, "b": 1, "c": 5, "d": 2, "e": 8, "f": 5, "g": 1}
    users = [User(id=u, input="q", profile=[{"id": f"{u}{i}", "text": "t"} for i in range(n)], gold="x")
             for u, n in sizes.items()]
    groups = partition_users(users, users_per_client=2, by="profile-size", seed=3)
    assert [[u.id for u in g] for g in groups] == [["b", "g"], ["d", "c"], ["f", "e"], ["a"]]
    assert [[len(u.profile) for u in g] for g in groups] == [[1, 1], [2, 5], [5, 8], [9]]
    # unlike the id partitioner, the seed does not change it
    assert partition_users(users, 2, "profile-size", seed=4) == groups
    assert [[u.id for u in g] for g in partition_users(users, 2, "id", seed=3)] != [[u.id for u in g] for g in groups]
