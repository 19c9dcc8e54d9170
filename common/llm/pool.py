"""One bounded pool of LLM requests per process: threads that run independent requests together, and the
limit on requests in flight that adapts to the endpoint (AIMD) and obeys optional rate caps.

Why our own and not concurrent.futures or an async client: the stages fan out at two levels at once (users,
then each user's pseudo-queries and candidates), and a nested ThreadPoolExecutor.map deadlocks once every
worker waits on inner work queued behind it. Here the caller always works through its own list, and helpers
join only while the process-wide helper budget allows, so nesting never deadlocks, at most `concurrency`
threads work at once, and results come back in input order whatever ran first. Determinism needs nothing
else: every request's answer depends on the request alone (seeded), never on what ran before it.

The in-flight limit (RequestLimit) lives here, not in the openai client, because the client retries 429s
inside one call where no pool sees them: to back off, the pool must see each refusal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

OPENAI_CONCURRENCY = 16  # a hosted endpoint or vLLM answers many requests at once
EMBEDDED_CONCURRENCY = 1  # CPU decoding in one llama.cpp context gains nothing from threads
BURST_SECONDS = 10.0  # a rate cap lets at most this many seconds' worth of requests/tokens go at once


class RequestPool:
    """Runs independent LLM requests `concurrency` at a time (map), under `limit` (in flight, rates)."""

    def __init__(self, concurrency: int = 1, rpm: float = 0, tpm: float = 0):
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"llm-concurrency must be an int >= 1, got {concurrency!r}")
        self.concurrency = concurrency
        self.limit = RequestLimit(concurrency, rpm=rpm, tpm=tpm)
        self._helpers = threading.BoundedSemaphore(concurrency - 1) if concurrency > 1 else None

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """[fn(x) for x in items], run up to `concurrency` at once; results in input order. The first failure
        (in input order, among the items that ran) is raised once every started item has finished."""
        items = list(items)
        if self._helpers is None or len(items) <= 1:
            return [fn(x) for x in items]
        results: list = [None] * len(items)
        errors: dict[int, BaseException] = {}
        lock = threading.Lock()
        state = {"next": 0, "starting": 0}  # starting: helpers started that have not taken an item yet
        stop = threading.Event()
        threads: list[threading.Thread] = []

        def take(first: bool = False) -> int | None:
            with lock:
                if first:
                    state["starting"] -= 1
                if stop.is_set() or state["next"] >= len(items):
                    return None
                i = state["next"]
                state["next"] += 1
                return i

        def recruit() -> None:
            """Start helpers while items wait that no starting helper will take, and the process-wide budget has room."""
            while True:
                with lock:
                    if stop.is_set() or len(items) - state["next"] <= state["starting"]:
                        return
                    if not self._helpers.acquire(blocking=False):
                        return
                    state["starting"] += 1
                t = threading.Thread(target=helper, name="llm-pool", daemon=True)
                threads.append(t)
                t.start()

        def work(first: int | None) -> None:
            i = first
            while i is not None:
                recruit()
                try:
                    results[i] = fn(items[i])
                except BaseException as exc:  # handed to the caller, in input order
                    with lock:
                        errors[i] = exc
                    stop.set()
                i = take()

        def helper() -> None:
            try:
                work(take(first=True))
            finally:
                self._helpers.release()

        try:
            work(take())
        finally:
            joined = 0  # a live helper may still append a helper: it is joined before the list ends
            while joined < len(threads):
                threads[joined].join()
                joined += 1
        if errors:
            raise errors[min(errors)]
        return results

    def __repr__(self) -> str:
        return f"RequestPool(concurrency={self.concurrency}, limit={self.limit!r})"


def fan_out(llm, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """[fn(x) for x in items] through `llm`'s request pool (in order; plain loop when it has none)."""
    pool = getattr(llm, "pool", None)
    if pool is None:
        return [fn(x) for x in items]
    return pool.map(fn, items)


class RequestLimit:
    """How many requests may be in flight now: additive increase, multiplicative decrease (as TCP).

    Starts at `ceiling`. A success adds 1/limit (one more slot per window of successes); a refusal (429)
    halves the limit, at most once per window: refusals of requests sent before the last cut are the same
    congestion, already answered. A Retry-After pauses every request of the pool, not just the refused one.
    `rpm` / `tpm` (0: none) cap requests and tokens per minute with token buckets that hold
    BURST_SECONDS' worth; a request takes its estimated tokens, and the estimate is corrected by the
    usage the endpoint reports.
    """

    def __init__(self, ceiling: int, rpm: float = 0, tpm: float = 0):
        if ceiling < 1 or rpm < 0 or tpm < 0:
            raise ValueError(f"need ceiling >= 1, rpm >= 0, tpm >= 0; got {ceiling}, {rpm}, {tpm}")
        self.ceiling = ceiling
        self.value = float(ceiling)
        self.in_flight = 0
        self.max_in_flight = 0  # the most seen at once
        self.cuts = 0  # multiplicative decreases made
        self._cond = threading.Condition()
        self._last_cut = float("-inf")
        self._pause_until = 0.0
        self._requests = Bucket(rpm / 60.0) if rpm else None
        self._tokens = Bucket(tpm / 60.0) if tpm else None

    def acquire(self, tokens: int = 0) -> float:
        """Wait for a slot (and the rate caps); returns the ticket (send time) to give back to release()."""
        with self._cond:
            while True:
                now = time.monotonic()
                wait = max(self._pause_until - now, 0.0)
                if not wait and self.in_flight >= max(1, int(self.value)):
                    self._cond.wait(timeout=1.0)
                    continue
                if not wait and self._requests is not None:
                    wait = self._requests.wait_time(1, now)
                if not wait and self._tokens is not None:
                    wait = self._tokens.wait_time(tokens, now)
                if wait:
                    self._cond.wait(timeout=min(wait, 1.0))
                    continue
                if self._requests is not None:
                    self._requests.take(1, now)
                if self._tokens is not None:
                    self._tokens.take(tokens, now)
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                return now

    def release(self, ticket: float, refused: bool = False, retry_after: float | None = None,
                tokens_estimated: int = 0, tokens_used: int | None = None) -> None:
        """Give the slot back, saying whether the endpoint refused (429) and what the request really used."""
        with self._cond:
            self.in_flight -= 1
            now = time.monotonic()
            if refused:
                if ticket >= self._last_cut:
                    self.value = max(1.0, self.value / 2)
                    self._last_cut = now
                    self.cuts += 1
                if retry_after:
                    self._pause_until = max(self._pause_until, now + retry_after)
            else:
                self.value = min(float(self.ceiling), self.value + 1.0 / self.value)
            if self._tokens is not None and tokens_used is not None:
                self._tokens.take(tokens_used - tokens_estimated, now)  # negative gives tokens back
            self._cond.notify_all()

    def __repr__(self) -> str:
        return f"RequestLimit(limit={self.value:.2f}/{self.ceiling}, in flight {self.in_flight})"


class Bucket:
    """A token bucket refilled at `rate` per second, holding at most BURST_SECONDS of it (at least 1).
    Its level may go below zero (a request larger than the bucket, or a usage above the estimate): the
    next request then waits until it is refilled above zero."""

    def __init__(self, rate: float):
        self.rate = rate
        self.capacity = max(1.0, rate * BURST_SECONDS)
        self.level = self.capacity
        self._at = time.monotonic()

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self._at) * self.rate)
        self._at = now

    def wait_time(self, amount: float, now: float) -> float:
        """Seconds until `amount` may be taken (0: now); an amount above the capacity goes once the bucket is full."""
        self._refill(now)
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount


_POOLS: dict[tuple, RequestPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(endpoint: str, concurrency: int, rpm: float = 0, tpm: float = 0) -> RequestPool:
    """The process's one pool for `endpoint` with these settings: every LLM object made for the same endpoint
    in this process shares its threads, its in-flight limit and its rate caps."""
    key = (endpoint, concurrency, float(rpm), float(tpm))
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = RequestPool(concurrency, rpm=rpm, tpm=tpm)
        return pool
