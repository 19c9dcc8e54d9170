"""The task registry: every LaMP task, its kind, labels, fields and metrics."""

import pytest

from fedhydra.common.tasks import PROFILE_FIELDS, TASKS, get_task


def test_registry_has_every_lamp_task():
    assert set(TASKS) == {"LaMP_1", "LaMP_2N", "LaMP_2M", "LaMP_3", "LaMP_4", "LaMP_5", "LaMP_7"}
    assert set(PROFILE_FIELDS) == set(TASKS)


def test_kinds_labels_and_metrics():
    assert get_task("LaMP_2M").labels[0] == "sci-fi" and len(get_task("LaMP_2M").labels) == 15
    assert len(get_task("LaMP_2N").labels) == 15
    assert get_task("LaMP_3").metrics == ("mae", "rmse") and not get_task("LaMP_3").higher_is_better
    assert get_task("LaMP_7").metrics == ("rouge-1", "rouge-L", "bleu")
    assert get_task("LaMP_1").metrics == ("accuracy", "f1")


def test_lamp7_content_from_real_input_format():
    task = get_task("LaMP_7")
    inp = "Paraphrase the following tweet without any explanation before or after it: I am bored."
    assert task.content(inp) == "I am bored."
    assert task.item_answer({"id": "1", "text": " hi there "}) == "hi there"


def test_lamp1_content_is_the_two_reference_titles():
    inp = ('For an author who has written the paper with the title "Deep nets", which reference is related? '
           'Just answer with [1] or [2] without explanation. [1]: "Graph kernels" [2]: "Neural codes"')
    assert get_task("LaMP_1").content(inp) == "Graph kernels Neural codes"


def test_unknown_task_and_missing_marker_are_clear_errors():
    with pytest.raises(ValueError, match="unknown task 'LaMP_9'.*LaMP_7"):
        get_task("LaMP_9")
    with pytest.raises(ValueError, match="does not contain 'review:'"):
        get_task("LaMP_3").content("no marker here")
