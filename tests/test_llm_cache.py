"""The persistent response cache in front of the real embedded LLM."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedhydra.common.llm import CachedLLM, LLMError, ResponseCache, default_cache_dir, make_llm
from fedhydra.common.llm.cache import DB_NAME, cache_key
from fedhydra.common.llm.embedded import EmbeddedLLM, default_gguf_path, embedded_unavailable_reason

_REASON = embedded_unavailable_reason()


def needs_llm(test):
    """Mark a test as needing the embedded LLM and skip it, with the reason, where it cannot start."""
    skip = pytest.mark.skipif(_REASON is not None, reason=f"embedded LLM unavailable: {_REASON}")
    return pytest.mark.llm(skip(test))

MESSAGES = [{"role": "user", "content": "Invent a name for a new fantasy creature. Answer with the name only."}]
REQUEST = {"n": 1, "temperature": 1.0, "max_tokens": 8, "seed": 0}
# One thread: llama.cpp's spinning thread pool slows down many times over when the cores are shared.
THREADS = {"n_threads": 1}


@pytest.fixture(scope="module")
def embedded():
    if _REASON:
        pytest.skip(f"embedded LLM unavailable: {_REASON}")
    return EmbeddedLLM(**THREADS)


@pytest.fixture
def cached(embedded, tmp_path):
    return CachedLLM(embedded, ResponseCache(tmp_path / "cache"))


@needs_llm
def test_second_identical_call_is_a_hit_with_no_model_call(cached):
    before = cached.stats.copy()
    first = cached.complete(MESSAGES, **REQUEST)
    mid = cached.stats.minus(before)
    assert mid.calls == 1 and mid.cache_hits == 0 and mid.completion_tokens > 0
    second = cached.complete(MESSAGES, **REQUEST)
    used = cached.stats.minus(before)
    assert second == first
    assert used.calls == 1 and used.cache_hits == 1 and used.tokens == mid.tokens  # a hit costs no tokens
    assert len(cached.cache) == 1


@needs_llm
def test_every_field_that_changes_the_answer_misses(cached):
    cached.complete(MESSAGES, **REQUEST)
    variants = [
        ([{"role": "user", "content": MESSAGES[0]["content"] + " "}], REQUEST),
        ([{"role": "system", "content": MESSAGES[0]["content"]}], REQUEST),  # same text, other role
        (MESSAGES, REQUEST | {"n": 2}),
        (MESSAGES, REQUEST | {"temperature": 0.7}),
        (MESSAGES, REQUEST | {"max_tokens": 9}),
        (MESSAGES, REQUEST | {"seed": 1}),
    ]
    for messages, request in variants:
        before = cached.stats.copy()
        cached.complete(messages, **request)
        used = cached.stats.minus(before)
        assert used.cache_hits == 0 and used.calls == request["n"], (messages, request)
    assert len(cached.cache) == 1 + len(variants)
    before = cached.stats.copy()
    for messages, request in variants:  # now all stored
        cached.complete(messages, **request)
    assert cached.stats.minus(before).calls == 0 and cached.stats.minus(before).cache_hits == len(variants)


@needs_llm
def test_another_backend_name_misses(embedded, tmp_path):
    """The same weights under another file name are another backend (name) and must not share entries."""
    link = tmp_path / "renamed-copy.gguf"
    link.symlink_to(default_gguf_path())
    cache = ResponseCache(tmp_path / "cache")
    CachedLLM(embedded, cache).complete(MESSAGES, **REQUEST)
    other = CachedLLM(EmbeddedLLM(model_path=link, **THREADS), cache)
    assert other.name == "embedded:renamed-copy.gguf" != embedded.name
    other.complete(MESSAGES, **REQUEST)
    assert other.stats.calls == 1 and other.stats.cache_hits == 0 and len(cache) == 2


@needs_llm
def test_integer_and_float_temperature_share_an_entry(cached):
    cached.complete(MESSAGES, **REQUEST | {"temperature": 1})
    before = cached.stats.copy()
    cached.complete(MESSAGES, **REQUEST | {"temperature": 1.0})
    assert cached.stats.minus(before).cache_hits == 1


@needs_llm
def test_cache_persists_across_instances_and_processes(embedded, tmp_path):
    folder = tmp_path / "cache"
    answers = CachedLLM(embedded, ResponseCache(folder)).complete(MESSAGES, **REQUEST)
    again = CachedLLM(embedded, ResponseCache(folder))
    before = embedded.stats.copy()
    assert again.complete(MESSAGES, **REQUEST) == answers
    assert embedded.stats.minus(before).calls == 0
    key = cache_key(embedded.name, MESSAGES, **REQUEST)
    code = ("import json, sys; from fedhydra.common.llm.cache import ResponseCache; "
            "print(json.dumps(ResponseCache(sys.argv[1]).get(sys.argv[2])))")
    out = subprocess.run([sys.executable, "-c", code, str(folder), key], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == answers


@needs_llm
def test_failures_are_not_cached(tmp_path):
    small = CachedLLM(EmbeddedLLM(n_ctx=256, **THREADS), ResponseCache(tmp_path / "cache"))
    too_long = [{"role": "user", "content": "word " * 400}]
    for _ in range(2):  # the second attempt reaches the model again instead of replaying a stored failure
        with pytest.raises(LLMError, match="exceed context window"):
            small.complete(too_long, max_tokens=8)
    assert len(small.cache) == 0 and small.stats.cache_hits == 0


@needs_llm
def test_concurrent_threads_share_one_model_call_per_request(cached):
    seeds = [0, 1, 2] * 4
    before = cached.stats.copy()
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda s: cached.complete(MESSAGES, **REQUEST | {"seed": s}), seeds))
    used = cached.stats.minus(before)
    assert used.calls == 3 and used.cache_hits == len(seeds) - 3
    for seed, answers in zip(seeds, results):
        assert answers == results[seed]
    assert len(cached.cache) == 3


def test_store_is_thread_safe_without_a_model(tmp_path):
    cache = ResponseCache(tmp_path)

    def put_then_get(i: int) -> list[str] | None:
        cache.put(f"k{i}", "backend", [f"answer {i}", "é ✓"])
        return cache.get(f"k{i}")

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(put_then_get, range(200)))
    assert got == [[f"answer {i}", "é ✓"] for i in range(200)] and len(cache) == 200
    assert cache.get("absent") is None


def test_key_is_canonical():
    reordered = [{"content": MESSAGES[0]["content"], "role": "user"}]
    assert cache_key("b", MESSAGES, **REQUEST) == cache_key("b", reordered, **REQUEST)
    assert cache_key("b", MESSAGES, **REQUEST) != cache_key("c", MESSAGES, **REQUEST)
    assert len(cache_key("b", MESSAGES, **REQUEST)) == 64


def test_unreadable_or_foreign_cache_file_is_a_clear_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / DB_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match="not a usable SQLite database"):
        ResponseCache(tmp_path / "a")
    ResponseCache(tmp_path / "b").close()
    with sqlite3.connect(tmp_path / "b" / DB_NAME) as db:
        db.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(ValueError, match="schema version 99"):
        ResponseCache(tmp_path / "b")


def test_corrupt_entry_counts_as_a_miss(tmp_path):
    cache = ResponseCache(tmp_path)
    cache.put("k", "b", ["x"])
    with sqlite3.connect(cache.path) as db:
        db.execute("UPDATE responses SET answers = '{not json'")
    assert cache.get("k") is None


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDHYDRA_CACHE_DIR", str(tmp_path / "env"))
    assert default_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("FEDHYDRA_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "fedhydra"


@needs_llm
def test_make_llm_puts_the_cache_in_cache_dir(tmp_path):
    llm = make_llm("embedded", cache_dir=tmp_path / "c", **THREADS)
    assert isinstance(llm, CachedLLM) and llm.stats is llm.llm.stats
    llm.complete(MESSAGES, **REQUEST)
    assert (tmp_path / "c" / DB_NAME).is_file() and len(llm.cache) == 1
    assert not isinstance(make_llm("embedded", cache=False, **THREADS), CachedLLM)
