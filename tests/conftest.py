"""Shared fixtures: the real embedded LLM (one per session) behind a per-test cache, and a recorder of prompts."""

from __future__ import annotations

import os

import pytest
import torch

from fedhydra.common.llm import CachedLLM, ResponseCache
from fedhydra.common.llm.embedded import EmbeddedLLM, embedded_unavailable_reason

LLM_UNAVAILABLE = embedded_unavailable_reason()

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on the two cores: one thread each, in the processes the tests
    # start too (torch's and OpenMP's spinning pools stall when they oversubscribe shared cores).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def embedded_llm():
    if LLM_UNAVAILABLE:
        pytest.skip(f"embedded LLM unavailable: {LLM_UNAVAILABLE}")
    # One thread: llama.cpp's spinning thread pool stalls when the two cores are shared.
    return EmbeddedLLM(n_threads=1)


class RecordingLLM:
    """The real LLM, with every request it is asked kept, so tests can assert on what was sent."""

    def __init__(self, llm):
        self.llm, self.requests = llm, []

    @property
    def name(self):
        return self.llm.name

    @property
    def stats(self):
        return self.llm.stats

    def complete(self, messages, n=1, temperature=0.0, max_tokens=64, seed=0):
        self.requests.append({"messages": messages, "n": n, "temperature": temperature})
        return self.llm.complete(messages, n=n, temperature=temperature, max_tokens=max_tokens, seed=seed)

    def prompt_texts(self) -> list[str]:
        return [m["content"] for r in self.requests for m in r["messages"]]


@pytest.fixture
def llm(embedded_llm, tmp_path):
    """The embedded LLM behind a fresh response cache, recording its requests."""
    return RecordingLLM(CachedLLM(embedded_llm, ResponseCache(tmp_path / "llm-cache")))


@pytest.fixture(scope="module")
def module_llm(embedded_llm, tmp_path_factory):
    """As `llm`, shared by a module's tests (for a module-scoped fixture that trains once)."""
    return RecordingLLM(CachedLLM(embedded_llm, ResponseCache(tmp_path_factory.mktemp("llm-cache"))))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny batches gain nothing from 2 threads, and 2 threads on 2 busy shared cores ran 50x slower here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Every test that uses the embedded LLM is marked `llm` (select or skip them with -m)."""
    for item in items:
        if {"llm", "embedded_llm"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.llm)
