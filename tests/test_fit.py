"""Every prompt fits the model (common/fit.py): LaMP's split of the budget, the openai estimate, the embedded
model's exact count, and rag-4 on the longest review of the shared Amazon data run on the embedded model."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedhydra.common import fit
from fedhydra.common.baselines import Baseline
from fedhydra.common.data import load_split
from fedhydra.common.llm.openai_backend import OpenAIChat
from fedhydra.common.pipeline import messages_for
from fedhydra.common.records import User
from fedhydra.common.retrieval import Retriever
from fedhydra.common.tasks import get_task

AMAZON = Path("/work/shared/data/amazon")
NO_AMAZON = not (AMAZON / "rating" / "dev_questions.json").is_file()


def test_shares_follow_lamp_input_cap_equal_items_and_carry_over():
    # 100 tokens: the input may keep 60 while items are shown; items share 40 = 20 + 20
    assert fit.shares([500, 50, 50], 100) == [60, 20, 20]
    # a short first item passes its unused share on (LaMP's saved_tokens), then leftovers go back to the input
    assert fit.shares([500, 5, 50], 100) == [60, 5, 35]
    assert fit.shares([500, 5, 5], 100) == [90, 5, 5]
    # a short input leaves the items more room; no items: the input takes everything
    assert fit.shares([10, 80, 80], 100) == [10, 45, 45]
    assert fit.shares([500], 100) == [100]
    with pytest.raises(ValueError, match="no room"):
        fit.shares([5], -1)


def _user(task_name: str, query: str, items: list[str]) -> User:
    task = get_task(task_name)
    field = task.label_field
    profile = [{"id": f"u{i}", "text": t, field: "4" if field == "score" else f"title {i}"} for i, t in enumerate(items)]
    return User(id="u", input=task.instruction(query), profile=profile, gold="4")


def test_openai_prompts_fit_the_context_window_setting_by_a_conservative_estimate():
    task = get_task("LaMP_3")
    llm = OpenAIChat("http://127.0.0.1:9/v1", "any", context_window=512)  # no request is made
    long = "great strings " * 400
    user = _user("LaMP_3", long, [long, "short review about picks", long])
    before = fit.fit_stats(llm).copy()
    messages = messages_for(task, llm, user.input, user.profile, None, 0)
    counter = fit.counter_for(llm)
    assert isinstance(counter, fit.EstimateCounter)
    assert counter.prompt_tokens(messages) <= 512 - fit.answer_tokens(task, llm)
    text = " ".join(m["content"] for m in messages)
    assert "What is the score of the following review" in text and "short review about picks" in text
    cut = fit.fit_stats(llm).minus(before).as_dict()
    assert cut["prompts"] == 1 and cut["cut"] == 1
    assert cut["longest_before"] > 512 >= cut["longest_before"] - cut["most_removed"]
    # a prompt that fits is sent unchanged (cached answers stay valid)
    small = _user("LaMP_3", "fine", ["ok"])
    assert messages_for(task, llm, small.input, small.profile, None, 0)[-1]["content"] == small.input
    with pytest.raises(ValueError, match="context_window"):
        OpenAIChat("http://127.0.0.1:9/v1", "any", context_window=10)


@pytest.mark.llm
def test_embedded_counts_are_the_models_own_and_a_rating_asks_for_one_token(embedded_llm):
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": "What is 2 + 2? Answer 4."}]
    out = embedded_llm._llama.create_chat_completion(messages=messages, max_tokens=1)
    assert embedded_llm.prompt_tokens(messages) == out["usage"]["prompt_tokens"]
    assert fit.answer_tokens(get_task("LaMP_3"), embedded_llm) == 1
    assert fit.answer_tokens(get_task("LaMP_4"), embedded_llm) == 32  # a title: the task's own budget
    assert fit.answer_tokens(get_task("LaMP_7"), embedded_llm) == 64
    labels = get_task("LaMP_2N").labels  # "science & technology" needs more than one token
    assert fit.answer_tokens(get_task("LaMP_2N"), embedded_llm) == max(
        len(embedded_llm.token_ids(f)) for lab in labels for f in (lab, lab.capitalize(), lab.title()))


@pytest.mark.skipif(NO_AMAZON, reason=f"the shared Amazon data is absent ({AMAZON})")
def test_title_prompts_of_the_longest_reviews_fit_exactly(embedded_llm):
    split = load_split(AMAZON / "title")
    task, retriever = split.task, Retriever(split.task)
    budget = embedded_llm.context_window - fit.answer_tokens(task, embedded_llm)
    longest = sorted(split.users, key=lambda u: -max(len(u.input), *(len(p["text"]) for p in u.profile)))[:3]
    for user in longest:
        items = Baseline.parse("rag-4").items(task, retriever, user)
        messages = messages_for(task, embedded_llm, user.input, items, None, 0)
        assert embedded_llm.prompt_tokens(messages) <= budget
        assert messages[-1]["content"].startswith("Generate a headline for the following article:")


@pytest.mark.skipif(NO_AMAZON, reason=f"the shared Amazon data is absent ({AMAZON})")
def test_rag4_on_the_longest_review_runs_on_the_embedded_model_and_fits(llm):
    split = load_split(AMAZON / "rating")
    task = split.task
    # the user with the longest review of the data (query or profile item): its rag-4 prompt is > 5,000 tokens
    user = max(split.users, key=lambda u: max(len(u.input), *(len(p["text"]) for p in u.profile)))
    cut_before, stats_before = fit.fit_stats(llm).copy(), llm.stats.copy()
    answer = Baseline.parse("rag-4").answer(task, llm, Retriever(task), user)
    cut, used = fit.fit_stats(llm).minus(cut_before).as_dict(), llm.stats.minus(stats_before)
    assert cut["prompts"] == 1 and cut["cut"] == 1 and cut["longest_before"] > llm.llm.llm.context_window
    assert used.calls == 1 and used.completion_tokens <= 1  # a rating asks for one token
    assert used.prompt_tokens + 1 <= llm.llm.llm.context_window  # the model's own count of what it was sent
    assert answer.items and len(answer.candidates) == 1


def test_the_context_window_setting_sizes_the_embedded_model_and_its_prompts():
    from fedhydra.common.llm import llm_from_settings

    llm = llm_from_settings({"llm": "embedded", "llm-context-window": 512}, cache=False)
    assert llm.context_window == 512 and llm._llama.n_ctx() == 512
    task = get_task("LaMP_3")
    items = [{"id": str(i), "text": "great strings, " * 400, "score": "5"} for i in range(4)]
    messages = messages_for(task, llm, task.instruction("the tuner broke after a week " * 200), items, None, 0)
    assert llm.prompt_tokens(messages) + fit.answer_tokens(task, llm) <= 512
    assert llm.complete(messages, max_tokens=fit.answer_tokens(task, llm))  # the model takes it
