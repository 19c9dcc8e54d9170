"""Per-user BM25 retrieval over a LaMP profile: one index per user, built once, reused for every query.

The index statistics (term frequencies, IDF with its epsilon floor, document lengths, k1=1.5,
b=0.75) are rank-bm25's `BM25Okapi`, the retriever LaMP and HYDRA use. At build time the
index also precomputes, for every (term, item) pair, the term's BM25Okapi contribution to that
item (an inverted index), so a query only touches the items that share its terms instead of
BM25Okapi.get_scores' Python loop over every item for every query token. Scores are
bit-identical to `BM25Okapi(corpus).get_scores(tokenize(query))` (same expression, same
summation order); the tests check that against a fresh BM25Okapi.

Ranking: best score first, ties broken by profile order (LaMP's `np.argsort(...)[::-1]` breaks
them in reverse, arbitrarily). `top` always fills k when the profile allows, zero scores
included, as LaMP does. A query made from a profile item passes that item's id in
`exclude_ids` and never gets that item back (HYDRA.md §1.2: the reference code may leak it).
The item stays in the index statistics, so excluding it does not rebuild anything.

BM25Okapi quirk kept as is: on very small profiles (1-2 items) every IDF is <= 0, so scores
are zero or negative; the order is still BM25Okapi's.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

import numpy as np
from rank_bm25 import BM25Okapi

from .records import User
from .tasks import Task

_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Lowercased runs of word characters (`re.findall(r"\\w+", text.lower())`).

    LaMP splits raw text on whitespace, so "Paris," and "paris" are different terms there and
    punctuation glued to words (very common in tweets and titles) never matches. Lowercasing
    and splitting on non-word characters fixes that; `\\w` is Unicode-aware, so accented and
    non-Latin words survive. No stemming and no stop-word list: BM25's IDF already discounts
    frequent words, and the queries are short.
    """
    if not isinstance(text, str):
        raise ValueError(f"text to tokenize must be a string, got {type(text).__name__}: {text!r}")
    return _WORD.findall(text.lower())


class UserIndex:
    """BM25 over one user's profile (`task.item_text` of each item), built once in the constructor."""

    def __init__(self, task: Task, profile: Sequence[dict], *, user_id: str = "?"):
        self.task = task
        self.user_id = user_id
        self.profile: list[dict] = list(profile)
        self.ids: list[str] = []
        self._position: dict[str, int] = {}
        corpus: list[list[str]] = []
        for i, item in enumerate(self.profile):
            if not isinstance(item, dict) or "id" not in item:
                raise ValueError(f"user {user_id}: profile item {i} has no 'id': {str(item)[:80]!r}")
            item_id = str(item["id"])
            if item_id in self._position:
                raise ValueError(f"user {user_id}: profile id {item_id!r} appears twice; ids must be unique")
            try:
                text = task.item_text(item)
            except KeyError as missing:
                raise ValueError(
                    f"user {user_id}: profile item {item_id!r} lacks field {missing} that {task.name} indexes"
                ) from None
            self.ids.append(item_id)
            self._position[item_id] = i
            corpus.append(tokenize(text))
        self._build(corpus)

    def _build(self, corpus: list[list[str]]) -> None:
        self._postings: dict[str, list[tuple[int, float]]] = {}
        self._arrays: dict[str, tuple[int, int]] | None = None  # the NumPy layout, built on first heavy query
        # BM25Okapi divides by the mean length and the vocabulary size: nothing to index without a token.
        self.bm25: BM25Okapi | None = BM25Okapi(corpus) if any(corpus) else None
        if self.bm25 is None:
            return
        bm25 = self.bm25
        k1, b, avgdl = bm25.k1, bm25.b, bm25.avgdl
        # BM25Okapi.get_scores' own expression, operation for operation: Python floats are IEEE
        # doubles like NumPy's, so every contribution, and so every score, is bit-identical.
        norms = [k1 * (1 - b + b * doc_len / avgdl) for doc_len in bm25.doc_len]
        for d, frequencies in enumerate(bm25.doc_freqs):
            norm = norms[d]
            for term, tf in frequencies.items():
                value = bm25.idf[term] * (tf * (k1 + 1) / (tf + norm))
                self._postings.setdefault(term, []).append((d, value))

    def _build_arrays(self) -> None:
        """Postings as two flat arrays plus each term's slice, for queries touching many postings."""
        docs, values, self._arrays = [], [], {}
        for term, posting in self._postings.items():
            self._arrays[term] = (len(docs), len(docs) + len(posting))
            for d, value in posting:
                docs.append(d)
                values.append(value)
        self._docs = np.asarray(docs, dtype=np.int64)
        self._values = np.asarray(values, dtype=np.float64)

    # Above this many postings a query is scored with NumPy (np.bincount accumulates in input
    # order, so the sums stay bit-identical); below it a plain loop beats NumPy's call overhead.
    numpy_from_postings = 2048

    def __len__(self) -> int:
        return len(self.profile)

    def scores(self, query: str) -> np.ndarray:
        """BM25Okapi score of every profile item for `query`, in profile order (float64, length len(self)).

        Equal to `BM25Okapi(corpus).get_scores(tokenize(query))`: each query token, repeats
        included, adds its term's contribution in query order; a term outside the profile adds 0.
        """
        terms = [t for t in tokenize(query) if t in self._postings]
        n = len(self.profile)
        if sum(len(self._postings[t]) for t in terms) < self.numpy_from_postings or not terms:
            score = [0.0] * n
            for term in terms:
                for d, value in self._postings[term]:
                    score[d] += value
            return np.asarray(score, dtype=np.float64)
        if self._arrays is None:
            self._build_arrays()
        index = np.concatenate([np.arange(*self._arrays[t]) for t in terms])
        return np.bincount(self._docs[index], weights=self._values[index], minlength=n)

    def ranked(self, query: str, k: int, exclude_ids: Collection[str] = ()) -> list[tuple[dict, float]]:
        """Up to k (item, score) pairs, best first, ties in profile order, items of `exclude_ids` left out."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}")
        if isinstance(exclude_ids, str):
            raise ValueError(f"exclude_ids must be a collection of ids, not the string {exclude_ids!r}")
        excluded = set()
        for item_id in exclude_ids:
            position = self._position.get(str(item_id))
            if position is None:
                raise ValueError(f"user {self.user_id}: cannot exclude id {item_id!r}, it is not in the profile")
            excluded.add(position)
        if k == 0 or len(excluded) == len(self.profile):
            return []
        score = self.scores(query)
        picked: list[tuple[dict, float]] = []
        # A stable sort of the negated scores keeps equal scores in profile order.
        for i in np.argsort(-score, kind="stable").tolist():
            if i not in excluded:
                picked.append((self.profile[i], float(score[i])))
                if len(picked) == k:
                    break
        return picked

    def top(self, query: str, k: int, exclude_ids: Collection[str] = ()) -> list[dict]:
        """Up to k profile items for `query`, best first; never an item whose id is in `exclude_ids`."""
        return [item for item, _ in self.ranked(query, k, exclude_ids)]

    def top_for_item(self, item: dict, k: int) -> list[dict]:
        """The pseudo-query of a profile item: its own text as the query, the item itself excluded."""
        return self.top(self.task.item_text(item), k, exclude_ids=(str(item["id"]),))


class Retriever:
    """One `UserIndex` per user id, each built the first time the user is seen and reused after.

    `built` counts the indexes built so far (tests assert each user's is built once). User ids
    must be unique: a user whose id is indexed with a different number of profile items is refused.
    """

    def __init__(self, task: Task):
        self.task = task
        self._indexes: dict[str, UserIndex] = {}
        self.built = 0

    def __len__(self) -> int:
        return len(self._indexes)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._indexes

    def index(self, user: User) -> UserIndex:
        """The user's index, built on first use."""
        index = self._indexes.get(user.id)
        if index is None:
            index = UserIndex(self.task, user.profile, user_id=user.id)
            self._indexes[user.id] = index
            self.built += 1
        elif len(index.profile) != len(user.profile):  # a cheap guard against two users sharing an id
            raise ValueError(
                f"user {user.id} was indexed with {len(index.profile)} profile items, now has "
                f"{len(user.profile)}: two different users share the id"
            )
        return index

    def top(self, user: User, query: str, k: int, exclude_ids: Collection[str] = ()) -> list[dict]:
        """Up to k of the user's profile items for `query` (see `UserIndex.top`)."""
        return self.index(user).top(query, k, exclude_ids)

    def top_for_input(self, user: User, k: int) -> list[dict]:
        """Up to k profile items for the user's real query; the BM25 query is `task.content(user.input)`."""
        return self.top(user, self.task.content(user.input), k)

    def top_for_item(self, user: User, item: dict, k: int) -> list[dict]:
        """Up to k profile items for a pseudo-query made from `item`, which is never returned."""
        return self.index(user).top_for_item(item, k)
