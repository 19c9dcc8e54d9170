"""Checks every backend applies to a complete() request before it spends a model call."""

from __future__ import annotations

ROLES = ("system", "user", "assistant")


def check_request(messages: list, n: int, temperature: float, max_tokens: int, seed: int) -> None:
    """Raise ValueError with one clear line naming the bad argument; return None when the request is well formed."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(
                f"messages[{i}] must be a dict with role in {ROLES} and a str content, got {m!r:.80}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise ValueError(f"temperature must be a number in [0, 2], got {temperature!r}")
    # Answer i uses seed + i; llama.cpp keeps seeds in 32 bits, so stay well inside that.
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0 or seed + n > 2**31:
        raise ValueError(f"seed must be an int with 0 <= seed and seed + n <= 2**31, got {seed!r}")
