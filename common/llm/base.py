"""The one interface every black-box LLM backend implements, and its usage counters."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


class LLMError(RuntimeError):
    """An LLM call failed for good (after retries). Never papered over with a shorter candidate list."""


@dataclass
class LLMStats:
    """Counts since the backend was made: calls that reached the model, tokens, cache hits, and the requests
    repeated (retries), among them those the endpoint refused with 429 (refusals) or answered with a 200 that
    was no usable chat completion (malformed)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_hits: int = 0
    retries: int = 0
    refusals: int = 0
    malformed: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict:
        return asdict(self) | {"tokens": self.tokens}

    def minus(self, before: "LLMStats") -> "LLMStats":
        """The counts between `before` (a copy taken earlier) and now."""
        return LLMStats(**{k: getattr(self, k) - getattr(before, k) for k in asdict(self)})

    def copy(self) -> "LLMStats":
        return LLMStats(**asdict(self))


class LLM(Protocol):
    """complete() returns exactly `n` answers or raises LLMError."""

    name: str  # identifies the model for the cache key (backend, model, base URL)
    stats: LLMStats

    def complete(
        self, messages: list[Message], n: int = 1, temperature: float = 0.0, max_tokens: int = 64, seed: int = 0
    ) -> list[str]: ...
