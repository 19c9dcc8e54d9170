"""A persistent SQLite response cache and the LLM wrapper that answers from it."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

from .base import LLM, LLMError, LLMStats, Message
from .request import check_request

SCHEMA_VERSION = 1
DB_NAME = "responses.sqlite3"
KEY_FORMAT = "fedhydra-llm-cache/1"  # bump when the key's contents change meaning


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: the argument, else $FEDHYDRA_CACHE_DIR, else ~/.cache/fedhydra."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FEDHYDRA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedhydra"


def cache_key(backend: str, messages: list[Message], n: int, temperature: float, max_tokens: int, seed: int) -> str:
    """sha256 of canonical JSON of everything that changes the answer."""
    payload = {
        "format": KEY_FORMAT,
        "backend": backend,  # includes model and base URL
        "messages": messages,  # whole dicts: any field sent to the model is part of the request
        "n": n,
        "temperature": float(temperature),  # 1 and 1.0 ask for the same thing
        "max_tokens": max_tokens,
        "seed": seed,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ResponseCache:
    """key -> list of answers in `folder`/responses.sqlite3 (WAL, usable from many threads and processes)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / DB_NAME
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"LLM cache {self.path} is not a usable SQLite database ({exc}); "
                             "delete it or choose another --cache-dir") from exc

    def _init_schema(self) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                row = self._db.execute("SELECT version FROM schema_version").fetchone()
                if row is None:
                    self._db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                elif row[0] != SCHEMA_VERSION:
                    raise ValueError(f"LLM cache {self.path} has schema version {row[0]}, this FedHydra "
                                     f"writes version {SCHEMA_VERSION}; delete it or choose another --cache-dir")
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, backend TEXT NOT NULL, "
                    "answers TEXT NOT NULL, created REAL NOT NULL)")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def get(self, key: str) -> list[str] | None:
        """The stored answers, or None when absent (or unreadable, which then counts as absent)."""
        with self._lock:
            row = self._db.execute("SELECT answers FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            answers = json.loads(row[0])
        except json.JSONDecodeError:
            return None
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            return None
        return answers

    def put(self, key: str, backend: str, answers: list[str]) -> None:
        """Store (or replace) one answer list; committed before returning."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (key, backend, answers, created) VALUES (?, ?, ?, ?)",
                (key, backend, json.dumps(answers, ensure_ascii=False), time.time()))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "ResponseCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.folder)!r})"


class CachedLLM:
    """Any LLM behind a ResponseCache. Same interface; `stats` is the wrapped backend's own counter object,
    so it is the single source of model calls, tokens, retries and (counted here) cache hits.
    Failures are never stored. Concurrent identical requests wait for one model call instead of racing: the
    waiters hold a thread of the request pool but no request slot (the backend takes those), so coalescing
    cannot starve the pool."""

    def __init__(self, llm: LLM, cache: ResponseCache):
        self.llm = llm
        self.cache = cache
        self.name = llm.name
        self.stats: LLMStats = llm.stats
        self.pool = getattr(llm, "pool", None)  # the backend's request pool: stages fan out through it
        self._hits_lock = threading.Lock()
        self._inflight_lock = threading.Lock()
        self._inflight: dict[str, list] = {}  # key -> [lock, number of waiters]

    def complete(
        self, messages: list[Message], n: int = 1, temperature: float = 0.0, max_tokens: int = 64, seed: int = 0
    ) -> list[str]:
        """The cached answers for this exact request, else the backend's (then stored)."""
        check_request(messages, n, temperature, max_tokens, seed)
        key = cache_key(self.llm.name, messages, n, temperature, max_tokens, seed)
        answers = self._lookup(key, n)
        if answers is not None:
            return answers
        entry = self._acquire(key)
        try:
            answers = self._lookup(key, n)  # another thread may have filled it while we waited
            if answers is not None:
                return answers
            answers = self.llm.complete(messages, n=n, temperature=temperature, max_tokens=max_tokens, seed=seed)
            if len(answers) != n:  # never store (or pass on) a shifted candidate list
                raise LLMError(f"{self.llm.name} returned {len(answers)} answers for n={n}")
            self.cache.put(key, self.llm.name, answers)
            return answers
        finally:
            self._release(key, entry)

    def _lookup(self, key: str, n: int) -> list[str] | None:
        answers = self.cache.get(key)
        if answers is None or len(answers) != n:
            return None
        with self._hits_lock:
            self.stats.cache_hits += 1
        return answers

    def _acquire(self, key: str) -> list:
        with self._inflight_lock:
            entry = self._inflight.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        entry[0].acquire()
        return entry

    def _release(self, key: str, entry: list) -> None:
        entry[0].release()
        with self._inflight_lock:
            entry[1] -= 1
            if entry[1] == 0:
                del self._inflight[key]

    def __repr__(self) -> str:
        return f"CachedLLM({self.llm!r}, {self.cache!r})"
