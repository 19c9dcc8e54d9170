"""Prompt builders: instruction applied once, items in the documented order and format."""

import pytest

from fedhydra.common import prompts
from fedhydra.common.tasks import TASKS, get_task

ITEMS_2M = [
    {"id": "1", "description": "A robot rebels against its makers.", "tag": "dystopia"},
    {"id": "2", "description": "Two detectives chase a killer.", "tag": "violence"},
]


def test_zero_shot_is_the_input_once():
    task = get_task("LaMP_2M")
    query = task.instruction("A ship lands on Mars.")
    msgs = prompts.zero_shot(task, query)
    assert msgs == [{"role": "user", "content": query}]
    assert msgs[0]["content"].count("Which tag does this movie relate to") == 1


def test_chat_style_turns_follow_rank_order():
    task = get_task("LaMP_2M")
    query = task.instruction("A ship lands on Mars.")
    msgs = prompts.with_items(task, query, ITEMS_2M, "chat")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[0]["content"] == task.instruction(ITEMS_2M[0]["description"])
    assert msgs[1]["content"] == "dystopia" and msgs[3]["content"] == "violence"
    assert msgs[-1]["content"] == query


def test_system_style_lists_examples_before_query():
    task = get_task("LaMP_7")
    items = [{"id": "a", "text": "omg soo tired today"}, {"id": "b", "text": "loving this rain lol"}]
    query = task.instruction("I am very tired today.")
    msgs = prompts.with_items(task, query, items, "system")
    assert msgs[0]["role"] == "system" and msgs[1] == {"role": "user", "content": query}
    sys_text = msgs[0]["content"]
    assert sys_text.index("omg soo tired today") < sys_text.index("loving this rain lol")


def test_lamp_style_is_lamps_rag_string():
    task = get_task("LaMP_7")
    items = [{"id": "a", "text": "t1"}, {"id": "b", "text": "t2"}]
    msgs = prompts.with_items(task, "Paraphrase the following tweet without any explanation before or after it: x",
                              items, "lamp")
    assert msgs[0]["content"].startswith('"t1", and "t2" are written by a person. Following the given patterns Paraphrase')


def test_chat_style_for_lamp7_needs_a_pseudo_input():
    task = get_task("LaMP_7")
    with pytest.raises(ValueError, match="pseudo_input"):
        prompts.with_items(task, "q", [{"id": "a", "text": "t1"}], "chat")
    msgs = prompts.with_items(task, "q", [{"id": "a", "text": "t1", "pseudo_input": "neutral t1"}], "chat")
    assert msgs[0]["content"] == task.instruction("neutral t1") and msgs[1]["content"] == "t1"


def test_no_items_is_zero_shot_and_unknown_style_fails():
    task = get_task("LaMP_3")
    assert prompts.with_items(task, "q", [], "chat") == prompts.zero_shot(task, "q")
    with pytest.raises(ValueError, match="unknown prompt style"):
        prompts.with_items(task, "q", [{"id": "1", "text": "good", "score": "5"}], "fancy")


@pytest.mark.parametrize("name", [n for n in TASKS if n != "LaMP_1"])
def test_content_and_instruction_are_inverse(name):
    task = get_task(name)
    assert task.content(task.instruction("some content here")) == "some content here"
