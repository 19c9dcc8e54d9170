"""The request pool (order, bounds, nesting, AIMD, rate caps) and the openai backend through it, against a real
OpenAI-compatible HTTP server on 127.0.0.1 (common/llm/bench_endpoint.py) that answers from the request alone."""

from __future__ import annotations

import re
import threading
import time

import pytest

from fedhydra.common.llm import CachedLLM, LLMError, ResponseCache
from fedhydra.common.llm.bench_endpoint import MALFORMED_KINDS, BenchEndpoint, answer_for
from fedhydra.common.llm.pool import RequestLimit, RequestPool, fan_out

pytest.importorskip("openai")
from fedhydra.common.llm.openai_backend import OpenAIChat  # noqa: E402  (needs openai)

TINY = {"backoff": 0.01, "max_backoff": 0.05}


def msgs(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Rewrite sentence number {i} about apples and pears."}]


@pytest.fixture
def endpoint():
    made: list[BenchEndpoint] = []

    def start(**kw) -> BenchEndpoint:
        made.append(BenchEndpoint(**kw).start())
        return made[-1]

    yield start
    for e in made:
        e.close()


# --- the pool itself ---------------------------------------------------------------------------

class Gauge:
    """Counts calls running at once."""

    def __init__(self):
        self.now = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, x, sleep=0.02):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(sleep * (1 + (x * 7919) % 5) / 3)  # uneven durations: items finish out of order
        with self.lock:
            self.now -= 1
        return x * x


def test_map_keeps_input_order_and_bounds_concurrency():
    pool, gauge = RequestPool(6), Gauge()
    assert pool.map(gauge, range(40)) == [x * x for x in range(40)]
    assert 4 <= gauge.most <= 6
    serial, gauge1 = RequestPool(1), Gauge()
    assert serial.map(gauge1, range(10)) == [x * x for x in range(10)] and gauge1.most == 1


def test_nested_maps_finish_and_share_one_bound():
    pool, gauge = RequestPool(5), Gauge()
    out = pool.map(lambda u: pool.map(lambda j: gauge(u * 10 + j), range(7)), range(4))
    assert out == [[(u * 10 + j) ** 2 for j in range(7)] for u in range(4)]
    assert 2 <= gauge.most <= 5  # the inner items of all users together, never more than the pool


def test_first_failure_in_input_order_is_raised_after_started_items_finish():
    pool, finished = RequestPool(4), []

    def fn(x):
        time.sleep(0.01 * (10 - x))
        if x in (3, 7):
            raise ValueError(f"item {x}")
        finished.append(x)
        return x

    with pytest.raises(ValueError, match="item 3"):
        pool.map(fn, range(10))
    assert RequestPool(4).map(lambda x: x, []) == []


def test_fan_out_without_pool_is_a_loop():
    class NoPool:
        pass
    assert fan_out(NoPool(), lambda x: x + 1, [1, 2]) == [2, 3]


def test_aimd_halves_once_per_window_and_grows_back():
    limit = RequestLimit(16)
    tickets = [limit.acquire() for _ in range(16)]
    assert limit.in_flight == 16 and limit.max_in_flight == 16
    for t in tickets[:8]:  # eight refusals of requests sent together: one congestion, one cut
        limit.release(t, refused=True)
    assert limit.value == 8 and limit.cuts == 1
    for t in tickets[8:]:
        limit.release(t)
    assert 8 < limit.value < 10
    t = limit.acquire()  # sent after the cut: its refusal is news
    limit.release(t, refused=True)
    assert 4 < limit.value < 5 and limit.cuts == 2
    for _ in range(40):
        limit.release(limit.acquire())
    assert 8 < limit.value <= 16  # additive increase: about one slot per window of successes


def test_retry_after_pauses_every_request_of_the_pool():
    limit = RequestLimit(4)
    limit.release(limit.acquire(), refused=True, retry_after=0.3)
    start = time.monotonic()
    limit.release(limit.acquire())
    assert time.monotonic() - start >= 0.25


def test_requests_per_minute_cap_spaces_requests_after_the_burst():
    limit = RequestLimit(8, rpm=240)  # 4/s, a burst of 10 s worth (40)
    start = time.monotonic()
    for _ in range(42):
        limit.release(limit.acquire())
    assert 0.35 <= time.monotonic() - start < 2  # the 41st and 42nd waited a quarter second each


def test_tokens_per_minute_cap_counts_the_reported_usage():
    limit = RequestLimit(8, tpm=600)  # 10 tokens/s, bucket of 100
    t = limit.acquire(tokens=50)
    limit.release(t, tokens_estimated=50, tokens_used=100)  # used all 100: the next one waits
    start = time.monotonic()
    limit.release(limit.acquire(tokens=5), tokens_estimated=5, tokens_used=5)
    assert time.monotonic() - start >= 0.4


def test_pool_rejects_a_bad_size():
    with pytest.raises(ValueError, match="llm-concurrency"):
        RequestPool(0)


# --- the openai backend through the pool, against a real HTTP server -------------------------

def test_concurrent_answers_equal_serial_ones_and_are_faster(endpoint):
    ep = endpoint(latency=0.2)
    serial = OpenAIChat(ep.url, "m1", concurrency=1, **TINY)
    t0 = time.monotonic()
    one = serial.pool.map(lambda i: serial.complete(msgs(i), n=2, temperature=1.0, seed=i), range(12))
    t_serial = time.monotonic() - t0
    assert ep.stats(reset=True)["max_in_flight"] == 1
    wide = OpenAIChat(ep.url, "m2", concurrency=12, **TINY)
    t0 = time.monotonic()
    many = wide.pool.map(lambda i: wide.complete(msgs(i), n=2, temperature=1.0, seed=i), range(12))
    t_wide = time.monotonic() - t0
    seen = ep.stats()
    assert [[a for a in x] for x in many] == one  # the same answers, in the same order
    assert one[3] == [answer_for({"messages": msgs(3), "max_tokens": 64, "temperature": 1.0, "seed": s})
                      for s in (3, 4)]  # seed, then the seeded fallback (the server ignores n)
    assert 8 <= seen["max_in_flight"] <= 12 and seen["served"] == 24
    assert t_wide < t_serial / 4
    assert wide.seeded_fallback_requests == 12 and wide.stats.calls == 24


def test_refusals_beyond_4_in_flight_are_retried_counted_and_cut_the_limit(endpoint):
    ep = endpoint(latency=0.1, refuse_above=4, retry_after=0.05)
    llm = OpenAIChat(ep.url, "m", concurrency=16, **TINY)
    got = llm.pool.map(lambda i: llm.complete(msgs(i), seed=i), range(40))
    assert got == [[answer_for({"messages": msgs(i), "max_tokens": 64, "temperature": 0.0})] for i in range(40)]
    seen = ep.stats()
    assert seen["refused"] > 0 and llm.stats.refusals == seen["refused"] and seen["max_in_flight"] <= 4
    assert llm.pool.limit.cuts >= 1 and llm.stats.calls == 40


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_each_malformed_kind_is_retried_and_counted(endpoint, kind):
    ep = endpoint(latency=0.0, malformed=0.5, kinds=(kind,))  # every second reply
    llm = OpenAIChat(ep.url, "m", concurrency=1, **TINY)
    got = [llm.complete(msgs(i)) for i in range(4)]
    assert got == [[answer_for({"messages": msgs(i), "max_tokens": 64, "temperature": 0.0})] for i in range(4)]
    assert llm.stats.malformed == ep.stats()["malformed"] >= 3 and llm.stats.retries == llm.stats.malformed


@pytest.mark.parametrize("kind, says", [("not-json", "the body is not JSON"), ("no-choices", "no choices"),
                                        ("wrong-types", "content is int"), ("empty-content", "content is empty")])
def test_always_malformed_fails_after_bounded_retries_naming_endpoint_and_fault(endpoint, kind, says):
    ep = endpoint(latency=0.0, malformed=1.0, kinds=(kind,))
    llm = OpenAIChat(ep.url, "m", concurrency=4, max_retries=3, **TINY)
    with pytest.raises(LLMError) as info:
        llm.complete(msgs(0))
    text = str(info.value)
    assert ep.url in text and "4 attempt(s)" in text and says in text, text
    assert ep.stats()["served"] == 4 and llm.stats.malformed == 4 and llm.stats.calls == 0


def test_cache_coalesces_identical_requests_under_the_pool(endpoint, tmp_path):
    ep = endpoint(latency=0.2)
    llm = CachedLLM(OpenAIChat(ep.url, "m", concurrency=16, **TINY), ResponseCache(tmp_path))
    assert llm.pool is not None
    asks = [i % 3 for i in range(24)]  # 3 distinct requests, each asked 8 times at once
    got = fan_out(llm, lambda i: llm.complete(msgs(i), seed=0), asks)
    assert got == [[answer_for({"messages": msgs(i), "max_tokens": 64, "temperature": 0.0})] for i in asks]
    assert ep.stats()["served"] == 3 and llm.stats.calls == 3 and llm.stats.cache_hits == 21


# --- the stages: same labels, answers, row order and cache keys at any concurrency -------------

def _stage_outputs(url: str, cache, concurrency: int) -> dict:
    import sqlite3

    from fedhydra.common.config import get_config
    from fedhydra.common.hydra import make_labels
    from fedhydra.common.llm import make_llm
    from fedhydra.common.pipeline import HydraPipeline
    from fedhydra.common.retrieval import Retriever
    from fedhydra.common.synthetic import make_synthetic
    from fedhydra.simulations.compare import run_baselines

    split = make_synthetic("LaMP_7", n_users=4, seed=1, profile_size=(6, 8))
    task, users = split.task, split.users
    cfg = get_config("cpu", pseudo_queries=2, retrieve=3, k=2, candidates=3)
    llm = make_llm("openai", base_url=url, model="m", cache_dir=cache, concurrency=concurrency, **TINY)
    said: list[str] = []
    labels = {w: make_labels(task, llm, Retriever(task), users, cfg, None, w, True, said.append)
              for w in ("reranker", "adapter")}
    _, predictions = run_baselines(task, users, ["zero-shot", "rag-2"], llm, progress=False)
    pipe = HydraPipeline(task, llm, Retriever(task), None, None, cfg, None)
    answers = [(a.text, a.candidates) for a in pipe.answer_many(users, "reranker")]
    with sqlite3.connect(cache / "responses.sqlite3") as db:
        keys = sorted(k for (k,) in db.execute("SELECT key FROM responses"))
    return {"labels": repr(labels), "predictions": predictions, "answers": answers, "keys": keys,
            "calls": llm.stats.calls, "said": said}


def test_labels_answers_rows_and_cache_keys_do_not_depend_on_concurrency(endpoint, tmp_path):
    ep = endpoint(latency=0.02)
    one = _stage_outputs(ep.url, tmp_path / "c1", 1)
    assert ep.stats(reset=True)["max_in_flight"] == 1
    many = _stage_outputs(ep.url, tmp_path / "c8", 8)
    assert ep.stats()["max_in_flight"] > 2
    for what in ("labels", "predictions", "answers", "keys", "calls"):
        assert one[what] == many[what], what
    assert len(one["keys"]) > 20 and one["calls"] > len(one["keys"])  # n>1 asks: the server ignores n, seeded fallbacks
    # progress: prompts done, the LLM's requests per second and the time left, at every tenth of the way
    lines = [s for s in many["said"] if s.startswith("reranker labels:")]
    assert 5 <= len(lines) <= 11
    last = re.fullmatch(r"reranker labels: (\d+)/\1 prompts, (\d+) LLM requests \((\d+) from the cache, [\d.]+/s\), "
                        r"about 00:00 left", lines[-1])
    assert last, lines[-1]
    assert int(last[2]) >= int(last[1]) and 0 <= int(last[3]) < int(last[2])  # a cold cache answers few of them


def test_progress_lines_say_how_many_requests_the_cache_answered():
    from fedhydra.common.llm.base import LLMStats
    from fedhydra.common.llm.progress import LLMProgress

    stats, said = LLMStats(calls=7, cache_hits=3), []  # counts from before the stage are not its own
    with LLMProgress(stats, 4, "adapter candidates", say=said.append) as progress:
        for calls, hits in ((1, 0), (0, 2), (0, 1), (2, 0)):
            stats.calls, stats.cache_hits = stats.calls + calls, stats.cache_hits + hits
            progress.step()
    assert len(said) == 4
    last = r"adapter candidates: 4/4 prompts, 6 LLM requests \(3 from the cache, [\d.]+/s\), about 00:00 left"
    assert re.fullmatch(last, said[-1]), said[-1]
    assert said[1].startswith("adapter candidates: 2/4 prompts, 3 LLM requests (2 from the cache, ")
