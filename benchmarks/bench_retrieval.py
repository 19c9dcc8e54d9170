"""Benchmark: a persistent per-user BM25 index against rebuilding the index for every query.

Per user it runs the ~110 retrievals HYDRA makes for one user (HYDRA.md §1.2): the real query
plus pseudo-queries made from profile items (each excluding its own item), top-k each. Four ways:
  A. FedHydra `Retriever`: one `UserIndex` per user, built once (build time included);
  B. FedHydra `UserIndex` rebuilt for every query;
  C. rank_bm25 `BM25Okapi` built once per user, `get_scores` per query;
  D. rank_bm25 `BM25Okapi` rebuilt for every query (what LaMP's and HYDRA's prompt code does).
All four return the same ranking (checked on every query). Goal: B / A >= 10.

Run: .venv/bin/python benchmarks/bench_retrieval.py [--users N] [--queries 110] [--k 10]
Uses real LaMP-7 dev users from ../shared/data/lamp/LaMP_7 beside the checkout, or synthetic
profiles (seeded) when that folder is absent or --synthetic is given.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from rank_bm25 import BM25Okapi
from tqdm import tqdm

from fedhydra.common.records import User
from fedhydra.common.retrieval import Retriever, UserIndex, tokenize
from fedhydra.common.tasks import get_task

TASK = get_task("LaMP_7")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/lamp/LaMP_7"


def real_users(folder: Path, n: int, seed: int) -> list[User]:
    with open(folder / "dev_questions.json", encoding="utf-8") as f:
        rows = json.load(f)
    rows = random.Random(seed).sample(rows, min(n, len(rows)))
    return [User(id=str(r["id"]), input=r["input"], profile=r["profile"]) for r in rows]


def synthetic_users(n: int, seed: int) -> list[User]:
    """Tweet-like profiles: 9-169 items (LaMP-7 dev's range, median ~13) of 8-25 words from a Zipf vocabulary."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    users = []
    for u in range(n):
        size = min(169, 9 + int(rng.expovariate(1 / 8)))
        profile = [{"id": f"{u}-{j}", "text": " ".join(rng.choices(vocab, weights, k=rng.randint(8, 25)))}
                   for j in range(size)]
        users.append(User(id=str(u), input=TASK.instruction(profile[0]["text"][::-1]), profile=profile))
    return users


def workload(user: User, n_queries: int) -> list[tuple[str, tuple[str, ...]]]:
    """The real query, then pseudo-queries cycling through the profile, each excluding its own item."""
    queries = [(TASK.content(user.input), ())]
    for j in range(n_queries - 1):
        item = user.profile[j % len(user.profile)]
        queries.append((TASK.item_text(item), (str(item["id"]),)))
    return queries


def rank_bm25_top(bm25: BM25Okapi, profile: list[dict], query: str, k: int, exclude: tuple[str, ...]) -> list[str]:
    scores = bm25.get_scores(tokenize(query))
    order = sorted((i for i, it in enumerate(profile) if str(it["id"]) not in exclude), key=lambda i: (-scores[i], i))
    return [profile[i]["id"] for i in order[:k]]


def time_method(name: str, users: list[User], loads: dict[str, list], k: int, method) -> tuple[float, dict]:
    results: dict = {}
    start = time.perf_counter()
    for user in tqdm(users, desc=name, leave=False, file=sys.stderr):
        results[user.id] = method(user, loads[user.id], k)
    return time.perf_counter() - start, results


def persistent_fedhydra(retriever: Retriever):
    def run(user, queries, k):
        return [[it["id"] for it in retriever.top(user, q, k, exclude_ids=ex)] for q, ex in queries]
    return run


def rebuilt_fedhydra(user, queries, k):
    return [[it["id"] for it in UserIndex(TASK, user.profile, user_id=user.id).top(q, k, exclude_ids=ex)]
            for q, ex in queries]


def persistent_rank_bm25(user, queries, k):
    bm25 = BM25Okapi([tokenize(TASK.item_text(it)) for it in user.profile])
    return [rank_bm25_top(bm25, user.profile, q, k, ex) for q, ex in queries]


def rebuilt_rank_bm25(user, queries, k):
    out = []
    for q, ex in queries:
        bm25 = BM25Okapi([tokenize(TASK.item_text(it)) for it in user.profile])
        out.append(rank_bm25_top(bm25, user.profile, q, k, ex))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=200, help="users to sample (default 200)")
    ap.add_argument("--queries", type=int, default=110, help="retrievals per user (default 110)")
    ap.add_argument("--k", type=int, default=10, help="items per retrieval (default 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="LaMP_7 folder with dev_questions.json")
    ap.add_argument("--synthetic", action="store_true", help="use synthetic profiles even if the data is there")
    args = ap.parse_args(argv)
    if args.users < 1 or args.queries < 1 or args.k < 1:
        ap.error("--users, --queries and --k must be at least 1")

    if not args.synthetic and (args.data / "dev_questions.json").exists():
        users, source = real_users(args.data, args.users, args.seed), f"real LaMP-7 dev users from {args.data}"
    else:
        users, source = synthetic_users(args.users, args.seed), "synthetic LaMP-7-like profiles"
    loads = {u.id: workload(u, args.queries) for u in users}
    n_queries = sum(len(q) for q in loads.values())
    sizes = [len(u.profile) for u in users]
    print(f"data: {source}")
    print(f"users: {len(users)}  profile items: median {statistics.median(sizes):g}, max {max(sizes)}  "
          f"queries: {n_queries} ({args.queries}/user)  k: {args.k}")

    retriever = Retriever(TASK)
    runs = [
        ("A  FedHydra index, built once per user", persistent_fedhydra(retriever)),
        ("B  FedHydra index, rebuilt per query", rebuilt_fedhydra),
        ("C  rank_bm25 BM25Okapi, built once per user", persistent_rank_bm25),
        ("D  rank_bm25 BM25Okapi, rebuilt per query", rebuilt_rank_bm25),
    ]
    timings, reference = {}, None
    for name, method in runs:
        seconds, results = time_method(name, users, loads, args.k, method)
        timings[name[0]] = seconds
        if reference is None:
            reference = results
        elif results != reference:
            print(f"MISMATCH: {name} ranks differently from A", file=sys.stderr)
            return 1
        print(f"{name:<46} {seconds:8.3f} s total  {seconds / n_queries * 1e6:9.1f} us/query")
    assert retriever.built == len(users), "the persistent index must be built once per user"

    a, b, c, d = (timings[x] for x in "ABCD")
    print(f"same rankings from all four: yes ({n_queries} queries); indexes built by A: {retriever.built}")
    print(f"speed-up persistent vs rebuilt per query (B / A): {b / a:6.1f}x  (goal >= 10x)")
    print(f"speed-up vs LaMP/HYDRA-style rebuild      (D / A): {d / a:6.1f}x")
    print(f"rank_bm25 persistent vs rebuilt           (D / C): {d / c:6.1f}x")
    return 0


if __name__ == "__main__":
    np.seterr(all="raise")  # a division by zero in scoring would be a bug, not noise
    sys.exit(main())
