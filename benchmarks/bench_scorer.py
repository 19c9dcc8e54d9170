"""Benchmark: HydraScorer's scoring overhead over the raw encoder, and the frozen-output cache in training.

1. Scoring, per query (what HydraPipeline does): the reranker over 10 (query, item) pairs plus
   the adapter over 8 (query, candidate) pairs. HydraScorer.score (tokenise, layer-by-layer
   forward, head, softmax) against the raw AutoModel forward (tokenise + forward) on the same
   batches. Variants: cache off; cache on but cold (new pairs each query, as in serving: pays
   the cache stores); cache on and warm (pairs seen before). Goal: cache-off and cold ≤ 1.2×.
2. Training, per train_stage step (batch 32): cache off; cache cold (first epoch: fills it);
   cache warm (later epochs: lower layers skipped).

Median of --runs runs after a warm-up; torch on --threads threads (2 = this machine's cores).
Run: .venv/bin/python benchmarks/bench_scorer.py [--users 10] [--runs 5] [--max-length 256]
Uses real LaMP-7 dev users from ../shared/data/lamp/LaMP_7 beside the checkout, or synthetic
tweets when that folder is absent or --synthetic is given.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from fedhydra.common.encoder import default_encoder_path
from fedhydra.common.examples import ScoredExample
from fedhydra.common.scorer import HydraScorer
from fedhydra.common.tasks import get_task
from fedhydra.common.training import train_stage

TASK = get_task("LaMP_7")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/lamp/LaMP_7"
ITEMS, CANDIDATES = 10, 8


def real_queries(folder: Path, n: int, seed: int) -> list[tuple[str, str, list[str], list[str]]]:
    """(user, query, 10 profile tweets, 8 candidate-like tweets) per sampled LaMP-7 dev user."""
    with open(folder / "dev_questions.json", encoding="utf-8") as f:
        rows = [r for r in json.load(f) if len(r["profile"]) >= ITEMS + CANDIDATES]
    rng = random.Random(seed)
    out = []
    for r in rng.sample(rows, min(n, len(rows))):
        texts = [TASK.item_text(p) for p in rng.sample(r["profile"], ITEMS + CANDIDATES)]
        out.append((str(r["id"]), TASK.content(r["input"]), texts[:ITEMS], texts[ITEMS:]))
    return out


def synthetic_queries(n: int, seed: int) -> list[tuple[str, str, list[str], list[str]]]:
    rng = random.Random(seed)
    words = [f"word{i}" for i in range(3000)]

    def tweet() -> str:
        return " ".join(rng.choices(words, k=rng.randint(8, 25)))
    return [(str(u), tweet(), [tweet() for _ in range(ITEMS)], [tweet() for _ in range(CANDIDATES)])
            for u in range(n)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_scoring(queries, runs: int, max_length: int) -> dict[str, float]:
    from transformers import AutoModel, AutoTokenizer

    path = default_encoder_path()
    tok = AutoTokenizer.from_pretrained(path)
    raw = AutoModel.from_pretrained(path).eval()
    plain = HydraScorer(max_length=max_length, cache_mb=0, device="cpu")
    cached = HydraScorer(max_length=max_length, cache_mb=256, device="cpu")
    for m in (plain, cached):
        for user, *_ in queries:
            m.add_user(user)

    @torch.no_grad()
    def run_raw():
        for _, q, items, cands in queries:
            for texts in (items, cands):
                enc = tok([q] * len(texts), texts, truncation=True, max_length=max_length,
                          padding=True, return_tensors="pt")
                raw(**enc).last_hidden_state[:, 0]

    def run_scorer(model: HydraScorer, clear: bool):
        for user, q, items, cands in queries:
            if clear:
                model.clear_cache()
            model.score(user, q, items)
            model.score(user, q, cands)

    variants = {"raw encoder": run_raw, "scorer, cache off": lambda: run_scorer(plain, False),
                "scorer, cache cold": lambda: run_scorer(cached, True),
                "scorer, cache warm": lambda: run_scorer(cached, False)}
    for fn in variants.values():
        fn()  # warm-up (and fills the warm cache)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(runs):
        names = list(variants) if r % 2 == 0 else list(reversed(variants))  # alternate against drift
        for name in names:
            if name == "scorer, cache warm":
                run_scorer(cached, False)  # the cold run cleared it: refill before timing
            times[name].append(timed(variants[name]))
    return {k: statistics.median(v) / len(queries) for k, v in times.items()}


def bench_training(queries, runs: int, max_length: int, batch: int = 32, steps: int = 4) -> dict[str, float]:
    pairs = [(u, q, t) for u, q, items, cands in queries for t in items + cands]
    rng = random.Random(0)
    examples = [ScoredExample(u, q, t, rng.randint(0, 1)) for u, q, t in pairs][: batch * steps]
    if len(examples) < batch * steps:
        raise SystemExit(f"need {batch * steps} training pairs, have {len(examples)}: raise --users")
    out: dict[str, list[float]] = {"cache off": [], "cache cold": [], "cache warm": []}
    for _ in range(runs):
        plain = HydraScorer(max_length=max_length, cache_mb=0, device="cpu")
        cached = HydraScorer(max_length=max_length, cache_mb=1024, device="cpu")
        for name, model in (("cache off", plain), ("cache cold", cached), ("cache warm", cached)):
            r = train_stage(model, examples, epochs=1, batch_size=batch, progress=False)
            out[name].append(r["seconds"] / r["steps"])
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=10, help="queries per run (one per user)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--train-runs", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the raw model's load report and bar are noise here
    hf_logging.disable_progress_bar()
    real = not args.synthetic and (args.data / "dev_questions.json").is_file()
    queries = real_queries(args.data, args.users, 0) if real else synthetic_queries(args.users, 0)
    load = os.getloadavg()[0]
    print(f"data: {'LaMP-7 dev' if real else 'synthetic'}; {len(queries)} queries; max_length {args.max_length}; "
          f"torch threads {args.threads}; load average {load:.1f} on {os.cpu_count()} cores")

    per_query = bench_scoring(queries, args.runs, args.max_length)
    base = per_query["raw encoder"]
    print(f"\nscoring per query ({ITEMS} reranker + {CANDIDATES} adapter pairs), median of {args.runs} runs:")
    for name, sec in per_query.items():
        print(f"  {name:20s} {sec * 1000:8.1f} ms   {sec / base:5.2f}x raw")
    worst = max(per_query["scorer, cache off"], per_query["scorer, cache cold"]) / base
    print(f"  overhead goal <= 1.20x: {'met' if worst <= 1.2 else 'NOT met'} ({worst:.2f}x)")

    if not args.skip_training:
        step = bench_training(queries, args.train_runs, args.max_length)
        print(f"\ntrain_stage step (batch 32, top 2 of 6 layers train), median of {args.train_runs} runs:")
        for name, sec in step.items():
            print(f"  {name:12s} {sec:6.2f} s/step   {step['cache off'] / sec:5.2f}x faster than cache off")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
