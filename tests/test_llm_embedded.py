"""The embedded SmolLM2 backend: exact n, seeded reproducibility, token counts, clear errors."""

from __future__ import annotations

import threading

import pytest

from fedhydra.common.llm import LLMError
from fedhydra.common.llm.embedded import EmbeddedLLM, default_gguf_path, embedded_unavailable_reason

_REASON = embedded_unavailable_reason()
pytestmark = [pytest.mark.llm, pytest.mark.skipif(_REASON is not None, reason=f"embedded LLM unavailable: {_REASON}")]

CREATIVE = [{"role": "user", "content": "Invent a name for a new fantasy creature. Answer with the name only."}]
# One thread: llama.cpp's spinning thread pool slows down many times over when the cores are shared.
THREADS = {"n_threads": 1}
FACT = [{"role": "user", "content": "What is the capital of France? Answer in English."}]


@pytest.fixture(scope="module")
def llm() -> EmbeddedLLM:
    return EmbeddedLLM(**THREADS)


def test_name_is_the_gguf_file():
    path = default_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert EmbeddedLLM(**THREADS).name == f"embedded:{path.name}"


def test_returns_exactly_n_answers_and_counts_tokens(llm):
    before = llm.stats.copy()
    answers = llm.complete(CREATIVE, n=4, temperature=1.0, max_tokens=12, seed=3)
    used = llm.stats.minus(before)
    assert len(answers) == 4 and all(isinstance(a, str) and a for a in answers)
    assert used.calls == 4
    assert used.prompt_tokens >= 4 * 10  # the chat template alone is more than 10 tokens
    assert 4 <= used.completion_tokens <= 4 * 12
    assert used.cache_hits == 0 and used.retries == 0


def test_same_seed_same_answers_and_answer_i_uses_seed_plus_i(llm):
    first = llm.complete(CREATIVE, n=3, temperature=1.0, max_tokens=12, seed=11)
    again = llm.complete(CREATIVE, n=3, temperature=1.0, max_tokens=12, seed=11)
    assert first == again
    shifted = llm.complete(CREATIVE, n=2, temperature=1.0, max_tokens=12, seed=12)
    assert shifted == first[1:]


def test_answer_does_not_depend_on_the_previous_prompt(llm):
    """llama.cpp's prefix reuse must not leak into answers: the cache key holds only this request."""
    llm.complete(FACT, n=1, temperature=1.0, max_tokens=4, seed=0)
    after_other_prompt = llm.complete(CREATIVE, n=1, temperature=1.0, max_tokens=12, seed=21)
    llm.complete(CREATIVE, n=1, temperature=1.0, max_tokens=12, seed=5)
    after_same_prompt = llm.complete(CREATIVE, n=1, temperature=1.0, max_tokens=12, seed=21)
    other_messages = [{"role": "system", "content": "You are helpful."}] + CREATIVE
    llm.complete(other_messages, n=1, temperature=1.0, max_tokens=4, seed=0)  # shares a suffix, not the prompt
    after_similar_prompt = llm.complete(CREATIVE, n=1, temperature=1.0, max_tokens=12, seed=21)
    assert after_other_prompt == after_same_prompt == after_similar_prompt


def test_different_seeds_give_different_answers(llm):
    answers = [llm.complete(CREATIVE, n=1, temperature=1.0, max_tokens=12, seed=s)[0] for s in range(4)]
    assert len(set(answers)) >= 2, answers


def test_greedy_ignores_seed_and_answers_the_fact(llm):
    a = llm.complete(FACT, n=2, temperature=0.0, max_tokens=16, seed=0)
    b = llm.complete(FACT, n=1, temperature=0.0, max_tokens=16, seed=99)
    assert a[0] == a[1] == b[0]
    assert "Paris" in a[0]


def test_concurrent_threads_get_the_sequential_answers(llm):
    seeds = [21, 22, 23, 24]
    expected = {s: llm.complete(CREATIVE, n=1, temperature=1.0, max_tokens=10, seed=s) for s in seeds}
    got: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            got[seed] = llm.complete(CREATIVE, n=1, temperature=1.0, max_tokens=10, seed=seed)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert got == expected


def test_prompt_longer_than_context_is_a_clear_llm_error():
    small = EmbeddedLLM(n_ctx=256, **THREADS)
    with pytest.raises(LLMError, match=r"n_ctx=256.*exceed context window"):
        small.complete([{"role": "user", "content": "word " * 400}], max_tokens=8)
    assert small.stats.calls == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 0}, "n must be"),
    ({"max_tokens": 0}, "max_tokens must be"),
    ({"temperature": -1}, "temperature must be"),
    ({"seed": -1}, "seed must be"),
])
def test_bad_arguments_are_refused_before_any_call(llm, kwargs, match):
    before = llm.stats.calls
    with pytest.raises(ValueError, match=match):
        llm.complete(FACT, **kwargs)
    assert llm.stats.calls == before


def test_bad_messages_are_refused(llm):
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        llm.complete([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="non-empty list"):
        llm.complete([])


def test_missing_model_file_and_bad_settings(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF model file not found"):
        EmbeddedLLM(model_path=tmp_path / "absent.gguf")
    with pytest.raises(ValueError, match="n_ctx must be >= 256"):
        EmbeddedLLM(n_ctx=64)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    with pytest.raises(LLMError, match="could not load"):
        EmbeddedLLM(model_path=broken)
