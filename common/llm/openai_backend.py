"""Any OpenAI-compatible chat endpoint as a black-box LLM, with its own counted retries."""

from __future__ import annotations

import email.utils
import ipaddress
import os
import random
import threading
import time
from urllib.parse import urlparse

from .base import LLMError, LLMStats, Message
from .request import check_request

LOCAL_DUMMY_KEY = "sk-local"
RETRYABLE_STATUS = (408, 429)  # plus every 5xx


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


class OpenAIChat:
    """Chat completions from `base_url` (e.g. http://127.0.0.1:8765/v1) for `model`.

    complete() asks for n choices in one request; servers that ignore n (llama.cpp's) return fewer,
    and the rest come from n=1 requests seeded seed+k, seed+k+1, ... (k = choices received), so
    exactly n answers come back. Timeouts, connection errors, 408, 429 and 5xx are retried with
    exponential backoff plus jitter (Retry-After honoured, capped at max_retry_after); other
    statuses fail at once. A request that still fails raises LLMError; no partial list escapes.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60,
                 max_retries: int = 5, backoff: float = 0.5, max_backoff: float = 30.0,
                 max_retry_after: float = 60.0, context_window: int = 2048):
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
        self.seeded_fallback_requests = 0  # n=1 requests made because the server returned fewer than n
        self._stats_lock = threading.Lock()
        self._rng = random.Random()
        # The client's own retries are off: ours are counted in stats.retries.
        self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key, timeout=self.timeout, max_retries=0)

    def complete(
        self, messages: list[Message], n: int = 1, temperature: float = 0.0, max_tokens: int = 64, seed: int = 0
    ) -> list[str]:
        """Exactly n answers, or LLMError."""
        check_request(messages, n, temperature, max_tokens, seed)
        answers = self._request(messages, n, temperature, max_tokens, seed)[:n]
        while len(answers) < n:
            more = self._request(messages, 1, temperature, max_tokens, seed + len(answers))
            if not more:
                raise LLMError(
                    f"{self.name}: the server returned a completion with no choices (seed {seed + len(answers)})")
            with self._stats_lock:
                self.seeded_fallback_requests += 1
            answers.append(more[0])
        return answers

    def _request(self, messages: list[Message], n: int, temperature: float, max_tokens: int, seed: int) -> list[str]:
        """One chat completion request with retries; returns its choices' texts (maybe fewer than n)."""
        openai = self._openai
        last_error = "none"
        attempts = 0
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._stats_lock:
                    self.stats.retries += 1
            attempts = attempt + 1
            wait_hint = None
            try:
                resp = self._client.chat.completions.create(
                    model=self.model, messages=messages, n=n, temperature=float(temperature),
                    max_tokens=max_tokens, seed=seed)
            except openai.APIStatusError as exc:
                status = exc.status_code
                last_error = f"HTTP {status}: {_short(exc.message)}"
                if status not in RETRYABLE_STATUS and status < 500:
                    raise LLMError(
                        f"{self.name}: request refused with {last_error} (attempt {attempts}, not retried)") from exc
                wait_hint = retry_after_seconds(getattr(exc.response, "headers", None))
            except openai.APITimeoutError:
                last_error = f"timed out after {self.timeout:g} s"
            except openai.APIConnectionError as exc:
                last_error = f"connection error: {_short(str(exc.__cause__ or exc))}"
            except (openai.APIError, ValueError) as exc:  # e.g. a 200 whose body is not a chat completion
                raise LLMError(f"{self.name}: malformed response ({type(exc).__name__}: {_short(str(exc))}), "
                               f"attempt {attempt + 1}, not retried") from exc
            else:
                return self._answers(resp)
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, wait_hint))
        raise LLMError(f"{self.name}: request failed after {attempts} attempt(s) to {self.base_url} for model "
                       f"{self.model!r}; last error: {last_error}")

    def _answers(self, resp) -> list[str]:
        choices = getattr(resp, "choices", None) or []
        if not isinstance(choices, list) or not all(hasattr(c, "message") for c in choices):
            raise LLMError(f"{self.name}: malformed response: choices is {_short(repr(choices), 80)}")
        usage = getattr(resp, "usage", None)
        with self._stats_lock:
            self.stats.calls += 1
            if usage is not None:
                self.stats.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
                self.stats.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)
        choices = sorted(choices, key=lambda c: c.index or 0)
        return [((c.message.content if c.message else None) or "").strip() for c in choices]

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry attempt+1: the server's Retry-After (capped), else exponential backoff."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        base = min(self.backoff * 2**attempt, self.max_backoff)
        return base + self._rng.uniform(0, 0.1 * base)  # jitter spreads out clients retrying together

    def __repr__(self) -> str:
        return f"OpenAIChat({self.base_url!r}, {self.model!r})"


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
