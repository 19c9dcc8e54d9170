"""Benchmark: LLM requests in flight together against an endpoint with a fixed latency.

An OpenAI-compatible endpoint (common/llm/bench_endpoint.py, in its own process on 127.0.0.1) answers every
request after --latency seconds, from the request alone, and reports the most requests it saw in flight.
For the same LaMP-7 users (real data: ../shared/data/lamp/LaMP_7 beside the checkout, or --data), it runs
reranker and adapter label generation and a small evaluate (zero-shot, rag-4) at concurrency 1 and 16,
each with a fresh response cache, and prints both wall times and their ratio; labels and predictions must
be identical. Then, at concurrency 16: an endpoint that refuses (429) beyond 4 requests in flight, one whose
replies are malformed 20% of the time (5% of each kind), and one whose replies are all malformed (the run
must fail with a clear message after the bounded retries).

Run: .venv/bin/python benchmarks/bench_llm_concurrency.py [--users 20] [--latency 0.3] [--data DIR]
Exits 0 with a SKIP line when the LaMP-7 data is absent; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fedhydra.common.config import get_config
from fedhydra.common.data import load_split, split_users
from fedhydra.common.hydra import make_labels
from fedhydra.common.llm import LLMError, make_llm
from fedhydra.common.llm.bench_endpoint import MALFORMED_KINDS
from fedhydra.common.retrieval import Retriever
from fedhydra.simulations.compare import run_baselines

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lamp" / "LaMP_7"
METHODS = ["zero-shot", "rag-4"]


class Endpoint:
    """bench_endpoint in a child process (so its threads do not share this process's GIL)."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "fedhydra.common.llm.bench_endpoint", *args],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("serving at "):
            self.close()
            raise RuntimeError(f"the bench endpoint did not start: {line!r}")
        self.url = line.split()[-1]

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url.removesuffix("/v1") + "/stats?reset", timeout=10) as r:
            return json.load(r)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def __enter__(self) -> "Endpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run(url: str, task, users, cfg, concurrency: int, cache: Path, **kw) -> dict:
    """Labels and the small evaluate through one fresh LLM; what they produced and how long they took."""
    llm = make_llm("openai", base_url=url, model="bench", cache_dir=cache, concurrency=concurrency, **kw)
    t0 = time.perf_counter()
    retriever = Retriever(task)
    labels = {w: make_labels(task, llm, retriever, users, cfg, None, w, False) for w in ("reranker", "adapter")}
    t_labels = time.perf_counter() - t0
    t1 = time.perf_counter()
    _, predictions = run_baselines(task, users, METHODS, llm, seed=cfg.seed, progress=False)
    t_eval = time.perf_counter() - t1
    return {"labels": repr(labels), "predictions": {m: [r["prediction"] for r in rows] for m, rows in predictions.items()},
            "n_labels": sum(len(v) for v in labels.values()), "t_labels": t_labels, "t_eval": t_eval,
            "wall": t_labels + t_eval, "stats": llm.stats.as_dict()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="a LaMP-7 split folder")
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--latency", type=float, default=0.3, help="the endpoint's seconds per request (0.3-0.5)")
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    if not Path(args.data).is_dir():
        print(f"SKIP: no LaMP-7 data at {args.data} (give --data DIR)")
        return 0
    split = load_split(args.data)
    _, users = split_users(split.users, 0, args.users, 0)
    task = split.task
    # Smaller than the cpu preset so concurrency 1 ends in minutes: 2 pseudo-queries, M=4, greedy + 4 samples.
    cfg = get_config("cpu", pseudo_queries=2, retrieve=4, k=2, candidates=4)
    lat = f"{args.latency:g}"
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        with Endpoint("--latency", lat) as ep:
            for c in (1, args.concurrency):
                runs[c] = run(ep.url, task, users, cfg, c, Path(tmp) / f"c{c}")
                runs[c]["server"] = ep.stats()
        one, many = runs[1], runs[args.concurrency]
        print(f"{task.name}, {len(users)} users, endpoint latency {lat} s, labels {one['n_labels']} examples")
        print("| concurrency | labels s | evaluate s | total s | requests served | max in flight |")
        print("|---:|---:|---:|---:|---:|---:|")
        for c, r in runs.items():
            print(f"| {c} | {r['t_labels']:.1f} | {r['t_eval']:.1f} | {r['wall']:.1f} | {r['server']['served']} "
                  f"| {r['server']['max_in_flight']} |")
        ratio = one["wall"] / many["wall"]
        same = one["labels"] == many["labels"] and one["predictions"] == many["predictions"]
        print(f"speed-up at {args.concurrency}: {ratio:.1f}x (labels {one['t_labels'] / many['t_labels']:.1f}x, "
              f"evaluate {one['t_eval'] / many['t_eval']:.1f}x); labels and predictions identical: {same}")
        if not same:
            failures.append("labels or predictions differ between concurrency 1 and 16")

        with Endpoint("--latency", lat, "--refuse-above", "4") as ep:
            r = run(ep.url, task, users, cfg, args.concurrency, Path(tmp) / "refuse")
            s = ep.stats()
        same = r["labels"] == one["labels"] and r["predictions"] == one["predictions"]
        print(f"429 beyond 4 in flight: {r['wall']:.1f} s, {s['refused']} refusals (client counted "
              f"{r['stats']['refusals']}), max in flight {s['max_in_flight']}; identical: {same}")
        if not same or s["refused"] == 0:
            failures.append("the 429 run differs or saw no refusal")

        with Endpoint("--latency", lat, "--malformed", "0.2") as ep:
            r = run(ep.url, task, users, cfg, args.concurrency, Path(tmp) / "malformed", backoff=0.1)
            s = ep.stats()
        same = r["labels"] == one["labels"] and r["predictions"] == one["predictions"]
        print(f"malformed replies, 5% of each of {', '.join(MALFORMED_KINDS)}: {r['wall']:.1f} s, "
              f"{s['malformed']} malformed of {s['served']} (client counted {r['stats']['malformed']}); "
              f"identical: {same}")
        if not same or r["stats"]["malformed"] != s["malformed"]:
            failures.append("the malformed run differs or miscounted")

        with Endpoint("--latency", "0.01", "--malformed", "1") as ep:
            t0 = time.perf_counter()
            try:
                run(ep.url, task, users[:1], cfg, args.concurrency, Path(tmp) / "broken", backoff=0.05)
                failures.append("every reply malformed, yet the run did not fail")
            except LLMError as exc:
                print(f"every reply malformed: failed after {time.perf_counter() - t0:.1f} s with: {exc}")
    if ratio < 8:
        print(f"note: below the 8x goal ({ratio:.1f}x)")
    for f in failures:
        print(f"FAIL: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
