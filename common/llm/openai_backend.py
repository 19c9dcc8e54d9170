"""Any OpenAI-compatible chat endpoint as a black-box LLM: requests through the process's request pool,
with its own counted retries."""

from __future__ import annotations

import email.utils
import ipaddress
import os
import random
import threading
import time
from urllib.parse import urlparse

from .base import LLMError, LLMStats, Message
from .pool import OPENAI_CONCURRENCY, shared_pool
from .request import check_request

LOCAL_DUMMY_KEY = "sk-local"
RETRYABLE_STATUS = (408, 429)  # plus every 5xx
REFUSAL_STATUS = (429, 503)  # the endpoint is at its limit: the pool halves its in-flight limit


def is_loopback_url(url: str) -> bool:
    """True when `url` points at this machine (localhost or a loopback address)."""
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def retry_after_seconds(headers) -> float | None:
    """Seconds a 429/503 asks us to wait (Retry-After-Ms, Retry-After as seconds or HTTP date), else None."""
    if headers is None:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None  # unreadable: fall back to our own backoff
    return max(0.0, when.timestamp() - time.time())


class MalformedReply(ValueError):
    """A 200 whose body is no usable chat completion; the message says what is wrong with it."""


class OpenAIChat:
    """Chat completions from `base_url` (e.g. http://127.0.0.1:8765/v1) for `model`.

    complete() asks for n choices in one request; servers that ignore n (llama.cpp's) return fewer,
    and the rest come from n=1 requests seeded seed+k, seed+k+1, ... (k = choices received), sent
    together through the request pool, so exactly n answers come back in seed order.

    Every request takes a slot of the process's request pool for this endpoint (pool.py: in-flight
    limit with AIMD, optional rpm/tpm caps). Timeouts, connection errors, 408, 429, 5xx and malformed
    200s (not JSON, no choices, wrong types, no text: see `reply_texts`) are retried with exponential
    backoff plus jitter (Retry-After honoured, capped at max_retry_after, and pausing the whole pool);
    other statuses fail at once. A request that still fails raises LLMError naming the endpoint and the
    last error; no partial list escapes.

    Retries are ours, not the openai client's (its max_retries is 0): the client does not retry a 200
    with an unusable body, retries 429s inside one call where the pool cannot see them to back off, and
    does not count its retries; all three are needed here (stats.retries, .refusals, .malformed).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60,
                 max_retries: int = 5, backoff: float = 0.5, max_backoff: float = 30.0,
                 max_retry_after: float = 60.0, concurrency: int = OPENAI_CONCURRENCY, rpm: float = 0,
                 tpm: float = 0, context_window: int = 2048):
        if not base_url or urlparse(base_url).scheme not in ("http", "https"):
            raise ValueError(f"base_url must be an http(s) URL such as http://127.0.0.1:8765/v1, got {base_url!r}")
        if not model:
            raise ValueError("model must name the endpoint's model, got an empty name")
        if max_retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError(f"need max_retries >= 0, backoff >= 0, timeout > 0; "
                             f"got {max_retries}, {backoff}, {timeout}")
        api_key = os.environ.get(api_key_env)
        if not api_key:
            if not is_loopback_url(base_url):
                raise ValueError(f"no API key for {base_url}: set the environment variable {api_key_env}")
            api_key = LOCAL_DUMMY_KEY  # local servers accept any key
        try:
            import openai
        except ImportError as exc:
            raise ModuleNotFoundError(
                f"--llm openai needs the openai client: `pip install openai==3.52.0` ({exc})") from exc
        self._openai = openai
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        if context_window < 256:
            raise ValueError(f"context_window must be >= 256 tokens, got {context_window}")
        self.context_window = int(context_window)  # prompt + answer tokens the model takes (common/fit.py)
        self.name = f"openai:{self.base_url}:{model}"
        self.stats = LLMStats()
        self.pool = shared_pool(self.name, concurrency, rpm=rpm, tpm=tpm)
        self.seeded_fallback_requests = 0  # n=1 requests made because the server returned fewer than n
        self._stats_lock = threading.Lock()
        self._rng = random.Random()
        # The client's own retries are off: ours are counted and seen by the pool (class docstring). Its
        # connection pool (1000 connections) holds whatever the request pool lets through at once.
        self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key, timeout=self.timeout, max_retries=0)

    def complete(
        self, messages: list[Message], n: int = 1, temperature: float = 0.0, max_tokens: int = 64, seed: int = 0
    ) -> list[str]:
        """Exactly n answers, or LLMError."""
        check_request(messages, n, temperature, max_tokens, seed)
        answers = self._request(messages, n, temperature, max_tokens, seed)[:n]
        if len(answers) < n:
            seeds = range(seed + len(answers), seed + n)
            with self._stats_lock:
                self.seeded_fallback_requests += len(seeds)
            answers += self.pool.map(lambda s: self._request(messages, 1, temperature, max_tokens, s)[0], seeds)
        return answers

    def _count(self, field: str) -> None:
        with self._stats_lock:
            setattr(self.stats, field, getattr(self.stats, field) + 1)

    def _request(self, messages: list[Message], n: int, temperature: float, max_tokens: int, seed: int) -> list[str]:
        """One chat completion request with retries; returns its choices' texts (at least one, maybe fewer than n)."""
        openai = self._openai
        estimate = sum(len(m["content"]) for m in messages) // 4 + n * max_tokens  # for the tokens-per-minute cap
        last_error = "none"
        attempts = 0
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
            attempts = attempt + 1
            wait_hint, refused, used = None, False, None
            ticket = self.pool.limit.acquire(estimate)
            try:
                resp = self._client.chat.completions.create(
                    model=self.model, messages=messages, n=n, temperature=float(temperature),
                    max_tokens=max_tokens, seed=seed)
                texts, used = reply_texts(resp)
            except openai.APIStatusError as exc:
                status = exc.status_code
                last_error = f"HTTP {status}: {_short(exc.message)}"
                if status not in RETRYABLE_STATUS and status < 500:
                    raise LLMError(
                        f"{self.name}: request refused with {last_error} (attempt {attempts}, not retried)") from exc
                wait_hint = retry_after_seconds(getattr(exc.response, "headers", None))
                refused = status in REFUSAL_STATUS
                if refused:
                    self._count("refusals")
            except openai.APITimeoutError:
                last_error = f"timed out after {self.timeout:g} s"
            except openai.APIConnectionError as exc:
                last_error = f"connection error: {_short(str(exc.__cause__ or exc))}"
            except (openai.APIError, ValueError) as exc:  # a 200 whose body is not a usable chat completion
                self._count("malformed")
                why = str(exc) if isinstance(exc, MalformedReply) else f"{type(exc).__name__}: {exc}"
                last_error = f"malformed reply (a 200 that is no usable chat completion): {_short(why)}"
            else:
                with self._stats_lock:
                    self.stats.calls += 1
                    self.stats.prompt_tokens += used[0]
                    self.stats.completion_tokens += used[1]
                return texts
            finally:
                capped = None if wait_hint is None else min(wait_hint, self.max_retry_after)
                self.pool.limit.release(ticket, refused=refused, retry_after=capped, tokens_estimated=estimate,
                                        tokens_used=None if used is None else sum(used))
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, wait_hint))
        raise LLMError(f"{self.name}: request failed after {attempts} attempt(s) to {self.base_url} for model "
                       f"{self.model!r}; last error: {last_error}")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry attempt+1: the server's Retry-After (capped), else exponential backoff."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        base = min(self.backoff * 2**attempt, self.max_backoff)
        return base + self._rng.uniform(0, 0.1 * base)  # jitter spreads out clients retrying together

    def __repr__(self) -> str:
        return f"OpenAIChat({self.base_url!r}, {self.model!r})"


def _field(obj, name: str):
    """obj.name or obj[name]: the client builds its objects without validation, so a wrong body may leave dicts."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def reply_texts(resp) -> tuple[list[str], tuple[int, int]]:
    """(the choices' texts in index order, (prompt tokens, completion tokens)), or MalformedReply saying why.

    Unusable: no choices (or not a list), a choice without a message, a content that is not a string, an
    index that is not an int, or an empty content unless the choice says the model stopped on purpose
    (finish_reason "stop": a model may answer nothing, and a seeded endpoint would repeat it forever).
    """
    if isinstance(resp, (str, bytes)):  # the client hands back a body it could not read as JSON as text
        raise MalformedReply(f"the body is not JSON: {_short(repr(resp), 80)}")
    choices = _field(resp, "choices")
    if choices is None:
        raise MalformedReply("no choices in the body")
    if not isinstance(choices, list):
        raise MalformedReply(f"choices is {_short(repr(choices), 80)}, not a list")
    if not choices:
        raise MalformedReply("no choices")
    texts = []
    for i, c in enumerate(choices):
        message, index = _field(c, "message"), _field(c, "index")
        if message is None:
            raise MalformedReply(f"choice {i} has no message")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
            raise MalformedReply(f"choice {i} has index {index!r}, not an int")
        content = _field(message, "content")
        if not isinstance(content, str):
            raise MalformedReply(f"choice {i}'s content is {type(content).__name__}, not text")
        if not content.strip() and _field(c, "finish_reason") != "stop":
            raise MalformedReply(f"choice {i}'s content is empty (finish_reason {_field(c, 'finish_reason')!r})")
        texts.append((index or 0, content.strip()))
    usage = _field(resp, "usage")
    tokens = [_field(usage, k) if usage is not None else 0 for k in ("prompt_tokens", "completion_tokens")]
    used = tuple(t if isinstance(t, int) and not isinstance(t, bool) else 0 for t in tokens)
    return [t for _, t in sorted(texts, key=lambda x: x[0])], used


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
