"""Benchmark of the black-box LLM layer: embedded decode speed, cache hit vs model call, the openai path.

Run: .venv/bin/python benchmarks/bench_llm.py [--threads 1 2] [--answers 8]
Prints one figure per line. The machine's load average is printed first: llama.cpp's spinning thread
pool slows down many times over when other processes share the cores, so figures taken under load
are not comparable.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fedhydra.common.llm import CachedLLM, ResponseCache
from fedhydra.common.llm.embedded import EmbeddedLLM
from fedhydra.common.llm.openai_backend import OpenAIChat

PROMPTS = [
    "Invent a name for a new fantasy creature and describe it in one sentence.",
    "Write a short tweet about a rainy Monday morning.",
    "Paraphrase: the committee postponed the vote until next week.",
    "Give a headline for a news story about a city opening a new park.",
]


def messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def time_answers(llm, answers: int, max_tokens: int):
    """After a warm-up call, `answers` samples for each prompt; returns (LLMStats used, wall seconds)."""
    llm.complete(messages("Hello."), max_tokens=4)
    before = llm.stats.copy()
    start = time.perf_counter()
    for text in PROMPTS:
        llm.complete(messages(text), n=answers, temperature=1.0, max_tokens=max_tokens, seed=0)
    return llm.stats.minus(before), time.perf_counter() - start


def bench_decode(threads: int, answers: int, max_tokens: int) -> None:
    llm = EmbeddedLLM(n_threads=threads)
    used, wall = time_answers(llm, answers, max_tokens)
    print(f"embedded decode ({threads} thread(s)): {used.calls} calls, {used.completion_tokens} completion tokens "
          f"in {wall:.2f} s = {used.completion_tokens / wall:.1f} tok/s (prompt eval included; "
          f"{wall / used.calls:.3f} s per answer, {used.prompt_tokens} prompt tokens)")


def bench_cache(threads: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        llm = CachedLLM(EmbeddedLLM(n_threads=threads), ResponseCache(folder))
        miss_times, hit_times = [], []
        for i, text in enumerate(PROMPTS):
            t = time.perf_counter()
            llm.complete(messages(text), n=1, temperature=1.0, max_tokens=24, seed=i)
            miss_times.append(time.perf_counter() - t)
        for _ in range(50):
            for i, text in enumerate(PROMPTS):
                t = time.perf_counter()
                llm.complete(messages(text), n=1, temperature=1.0, max_tokens=24, seed=i)
                hit_times.append(time.perf_counter() - t)
        miss, hit = statistics.median(miss_times), statistics.median(hit_times)
        print(f"cache: model call (miss) median {miss * 1e3:.1f} ms, hit median {hit * 1e6:.0f} us "
              f"(ratio {miss / hit:.0f}x); {llm.stats.calls} model calls, {llm.stats.cache_hits} hits")


def bench_openai(threads: int, answers: int, max_tokens: int) -> None:
    exe = Path(sys.executable).parent / "fedhydra"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    start = time.perf_counter()
    proc = subprocess.Popen([str(exe), "llm", "serve", "--port", str(port), "--threads", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"fedhydra llm serve exited with {proc.returncode}")
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2).close()
                break
            except OSError:
                if time.perf_counter() - start > 120:
                    raise SystemExit("fedhydra llm serve did not start within 120 s")
                time.sleep(0.2)
        print(f"openai: server ready in {time.perf_counter() - start:.1f} s")
        llm = OpenAIChat(url, "smollm2-135m", timeout=120)
        used, wall = time_answers(llm, answers, max_tokens)
        print(f"openai via local server ({threads} thread(s)): {len(PROMPTS)} x n={answers} -> {used.calls} requests "
              f"(server ignores n), {used.completion_tokens} completion tokens in {wall:.2f} s = "
              f"{used.completion_tokens / wall:.1f} tok/s, {wall / used.calls * 1e3:.0f} ms per answer")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="llama.cpp threads to try (default 1 2)")
    p.add_argument("--answers", type=int, default=8, help="answers per prompt (HYDRA's B; default 8)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--skip-openai", action="store_true")
    args = p.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    for threads in args.threads:
        bench_decode(threads, args.answers, args.max_tokens)
    bench_cache(min(args.threads))
    if not args.skip_openai:
        for threads in args.threads:
            bench_openai(threads, args.answers, args.max_tokens)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
