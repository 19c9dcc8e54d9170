"""The black-box LLM layer: one complete() interface over OpenAI-compatible and embedded backends.

Importing this package is cheap: llama_cpp and openai are imported only when a backend is made.
"""

from __future__ import annotations

import os

from .base import LLM, LLMError, LLMStats, Message
from .cache import CachedLLM, ResponseCache, default_cache_dir
from .pool import EMBEDDED_CONCURRENCY, OPENAI_CONCURRENCY, RequestPool, fan_out

BACKENDS = ("embedded", "openai")
DEFAULT_SERVED_MODEL = "smollm2-135m"  # the alias `fedhydra llm serve` gives the embedded model

__all__ = ["LLM", "LLMError", "LLMStats", "Message", "CachedLLM", "ResponseCache", "default_cache_dir",
           "make_llm", "llm_from_settings", "BACKENDS", "RequestPool", "fan_out"]


def make_llm(backend: str = "embedded", base_url: str | None = None, model: str | None = None,
             api_key_env: str = "OPENAI_API_KEY", cache_dir: str | os.PathLike | None = None,
             cache: bool = True, concurrency: int = 0, rpm: float = 0, tpm: float = 0, **kw) -> LLM:
    """The LLM the CLI options describe, behind the persistent response cache unless cache=False.

    embedded: SmolLM2-135M-Instruct in-process; `model` may name another GGUF file; kw goes to
      EmbeddedLLM (n_ctx, n_threads).
    openai: needs base_url; `model` defaults to the alias `fedhydra llm serve` uses; the key comes
      from the environment variable api_key_env; kw goes to OpenAIChat (timeout, max_retries, ...).
    The cache folder is default_cache_dir(cache_dir).
    concurrency: requests in flight together (the process's request pool, pool.py); 0 picks the backend's
      default (OPENAI_CONCURRENCY, EMBEDDED_CONCURRENCY). rpm / tpm: openai's requests / tokens per minute
      caps (0: none).
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 0:
        raise ValueError(f"--llm-concurrency must be an int >= 0 (0: the backend's default), got {concurrency!r}")
    if rpm < 0 or tpm < 0:
        raise ValueError(f"--llm-rpm and --llm-tpm must be >= 0 (0: no cap), got {rpm} and {tpm}")
    if backend == "embedded":
        if base_url:
            raise ValueError(f"--llm-base-url {base_url} is only used with --llm openai; "
                             "the embedded LLM runs in this process")
        from .embedded import EmbeddedLLM

        if rpm or tpm:
            raise ValueError("--llm-rpm and --llm-tpm cap a remote endpoint; the embedded LLM has no rate limit")
        llm = EmbeddedLLM(model_path=model, concurrency=concurrency or EMBEDDED_CONCURRENCY, **kw)
    elif backend == "openai":
        if not base_url:
            raise ValueError("--llm openai needs --llm-base-url, the endpoint's URL "
                             "(e.g. http://127.0.0.1:8765/v1 after `fedhydra llm serve`)")
        from .openai_backend import OpenAIChat

        llm = OpenAIChat(base_url, model or DEFAULT_SERVED_MODEL, api_key_env=api_key_env,
                         concurrency=concurrency or OPENAI_CONCURRENCY, rpm=rpm, tpm=tpm, **kw)
    else:
        raise ValueError(f"unknown LLM backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not cache:
        return llm
    return CachedLLM(llm, ResponseCache(default_cache_dir(cache_dir)))


def llm_from_settings(values: dict, cache_dir: str | os.PathLike | None = None, cache: bool = True) -> LLM:
    """The LLM the `llm` settings (common/settings.py) describe; `cache_dir` overrides the cache-dir setting."""
    backend = str(values.get("llm", "embedded"))
    window = int(values.get("llm-context-window", 2048))
    kw = {"n_threads": int(values.get("llm-threads", 1)), "n_ctx": window} if backend == "embedded" else \
        {"context_window": window}
    return make_llm(backend, base_url=values.get("llm-base-url") or None, model=values.get("llm-model") or None,
                    api_key_env=str(values.get("llm-api-key-env") or "OPENAI_API_KEY"),
                    cache_dir=cache_dir or values.get("cache-dir") or None, cache=cache,
                    concurrency=int(values.get("llm-concurrency", 0)), rpm=float(values.get("llm-rpm", 0)),
                    tpm=float(values.get("llm-tpm", 0)), **kw)
