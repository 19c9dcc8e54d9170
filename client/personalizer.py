"""The on-device personalization core behind the gRPC service: checked requests -> HYDRA pipeline.

No gRPC here (client/service.py maps these calls and errors onto the wire), so the rules can be
read in one place:

- A request is checked before any work: bad input raises `BadRequest` naming what is wrong,
  an id the state folder does not hold raises `UnknownUser`, a history id already present
  raises `ItemExists`. Nothing is written for a refused request.
- Models: the state folder's saved reranker and adapter (each user's own head, the shared
  default head for users without one). A folder without models yet (before the client's first
  training) is served without them: BM25 order and the greedy answer, i.e. the rag-k baseline,
  because untrained random heads would only reorder and pick at random. Saved models are
  reloaded when their files change (the federated client writes them atomically).
- Threads: `personalize` runs under one lock. The scorers switch train/eval mode per call and
  the embedded llama.cpp context serves one request at a time anyway; holding the lock also
  makes the per-request LLM counts exact. History appends take a second lock (read, append,
  write must not interleave) and never wait for the LLM. Status takes neither.
- History: an append is written atomically and fsynced before it is acknowledged. Each query
  reads the user's history from disk, and the BM25 index is rebuilt whenever the profile's item
  ids differ from those it was built on, so a query always retrieves from the history it read.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedhydra.common.pipeline import Answer
from fedhydra.common.config import HydraConfig, get_config
from fedhydra.common.llm.base import LLM, LLMStats
from fedhydra.common.pipeline import HydraPipeline
from fedhydra.common.records import User
from fedhydra.common.retrieval import Retriever, UserIndex
from fedhydra.common.tasks import PROFILE_FIELDS, TASKS, Task

from fedhydra.common.protocol import ADAPTER, ANSWER_MODES, FULL, MODULES, RERANKER

from .state import ClientState, StateError, check_user_id

log = logging.getLogger("fedhydra.service")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # C0 controls except tab, newline, CR


class BadRequest(ValueError):
    """The request is malformed; the message names the field and what is wrong."""


class UnknownUser(LookupError):
    """The user id is well formed but this client does not hold that user."""


class ItemExists(ValueError):
    """A history item id is already in the user's history (a retried append, usually)."""


@dataclass(frozen=True)
class Limits:
    """Request bounds: a service on a device must not be made to tokenize or store megabytes."""

    max_input_chars: int = 8000
    max_items: int = 100  # history items per AddHistory call
    max_field_chars: int = 8000
    max_id_chars: int = 128
    max_message_bytes: int = 4 * 2**20  # whole request, enforced by gRPC (RESOURCE_EXHAUSTED)


@dataclass
class Personalized:
    answer: Answer
    llm: LLMStats
    reranker_head: str  # "user", "default" or "none"
    adapter_head: str
    model_version: str
    task: str
    elapsed_ms: float


@dataclass
class _Models:
    reranker: object | None = None  # HydraScorer
    adapter: object | None = None
    signature: tuple = ()
    versions: dict = field(default_factory=dict)  # module -> (version, mtime)

    @property
    def version(self) -> str:
        if not self.versions:
            return "none"
        joined = "+".join(self.versions[m][0] for m in MODULES)
        return hashlib.sha256(joined.encode()).hexdigest()[:16]


class FreshRetriever(Retriever):
    """A Retriever whose per-user index is rebuilt whenever the user's profile ids change (appends)."""

    def __init__(self, task: Task):
        super().__init__(task)
        self._fresh: dict[str, tuple[tuple[str, ...], UserIndex]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._fresh)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._fresh

    def index(self, user: User) -> UserIndex:
        ids = tuple(str(item.get("id")) for item in user.profile)
        with self._lock:
            entry = self._fresh.get(user.id)
        if entry is not None and entry[0] == ids:
            return entry[1]
        built = UserIndex(self.task, user.profile, user_id=user.id)
        with self._lock:
            self._fresh[user.id] = (ids, built)
            self.built += 1
        return built

    def forget(self, user_id: str) -> None:
        with self._lock:
            self._fresh.pop(user_id, None)


class Personalizer:
    """Serves one client state folder: personalize, add_history, status (see the module docstring)."""

    def __init__(self, state: ClientState, llm: LLM, *, config: HydraConfig | None = None,
                 limits: Limits = Limits(), device: str | None = None, encoder: str | None = None):
        self.state, self.llm, self.limits = state, llm, limits
        self.task = state.task
        self.config = config or state.config() or get_config("auto")
        # the margin its fit-and-evaluate chose; a state that was never calibrated answers greedily
        self.margin = None if self.config.margin in ("auto", "off") else float(self.config.margin)
        self.device, self.encoder = device, encoder
        self.retriever = FreshRetriever(self.task)
        self._infer_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._served = itertools.count()
        self.requests_served = 0
        self.closed = False
        self._models = _Models()
        self._refresh_models()

    # ------------------------------------------------------------------ models
    def _signature(self) -> tuple:
        sig = []
        for m in MODULES:
            path = self.state.model_path(m)
            try:
                st = path.stat()
                sig.append((st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                sig.append(None)
        return tuple(sig)

    def _refresh_models(self) -> None:
        """(Re)load the saved models when their files changed since the last load (call under _infer_lock)."""
        sig = self._signature()
        if sig == self._models.signature:
            return
        if None in sig:  # not trained yet (or one file missing): serve without models
            self._models = _Models(signature=sig)
            return
        try:
            versions = {m: (_file_version(self.state.model_path(m)), self.state.model_path(m).stat().st_mtime)
                        for m in MODULES}
            loaded = self.state.load_models(device=self.device, encoder=self.encoder)
        except Exception:
            if not self._models.signature:  # at start-up: refuse to serve a broken state
                raise
            # Later: keep answering with the models already loaded; retry when the files change again.
            log.exception("cannot load the saved models of %s; still serving version %s",
                          self.state.folder, self._models.version)
            self._models.signature = sig
            return
        # If the files changed again while loading, the signature taken before reloads them next time.
        self._models = _Models(loaded.reranker, loaded.adapter, sig, versions)

    # ------------------------------------------------------------------ checks
    def check_user(self, user_id: str) -> str:
        if not user_id:
            raise BadRequest("user_id is empty: give the id of a user this client holds")
        try:
            check_user_id(user_id)
        except StateError as exc:
            raise BadRequest(f"user_id: {exc}") from None
        if user_id not in self.state.roles:
            raise UnknownUser(f"user {user_id!r} is not held by this client "
                              f"({len(self.state.roles)} users; see Status)")
        return user_id

    def check_task(self, task: str) -> Task:
        if not task:
            return self.task
        if task not in TASKS:
            raise BadRequest(f"task {task[:64]!r} is unknown; known tasks: {', '.join(TASKS)}")
        if task != self.task.name:
            raise BadRequest(f"task {task} is not served here: this client's users and models are for "
                             f"{self.task.name}")
        return self.task

    def _check_text(self, what: str, text: str, limit: int) -> str:
        if len(text) > limit:
            raise BadRequest(f"{what} is {len(text)} characters long; the limit is {limit}")
        if not text.strip():
            raise BadRequest(f"{what} is empty")
        bad = _CONTROL.search(text)
        if bad:
            raise BadRequest(f"{what} contains control character {bad.group()!r} at position {bad.start()}")
        return text

    def full_input(self, text: str) -> str:
        """The LaMP input for `text`: taken as is when it holds the task's instruction, else built from it."""
        self._check_text("input", text, self.limits.max_input_chars)
        task = self.task
        if not task.marker or task.marker in text:  # LaMP_1 has no marker: inputs are always full
            if not task.content(text):
                raise BadRequest(f"input has the {task.name} instruction but no content after {task.marker!r}")
            return text
        return task.instruction(text.strip())

    def check_items(self, user: User, items: list[dict]) -> list[dict]:
        """Validated copies of `items` ({"id"?, field: text}) for `user`; raises BadRequest / ItemExists."""
        limits, task = self.limits, self.task
        fields = PROFILE_FIELDS[task.name]
        if not items:
            raise BadRequest(f"items is empty: give at least one history item with fields {', '.join(fields)}")
        if len(items) > limits.max_items:
            raise BadRequest(f"{len(items)} items in one call; the limit is {limits.max_items}")
        known = {str(i["id"]) for i in user.profile}
        seen: set[str] = set()
        out = []
        for n, item in enumerate(items):
            item_id = item.get("id", "")
            if item_id:
                self._check_text(f"items[{n}].id", item_id, limits.max_id_chars)
                if item_id in seen:
                    raise BadRequest(f"items[{n}].id {item_id!r} appears twice in this request")
                if item_id in known:
                    raise ItemExists(f"items[{n}].id {item_id!r} is already in user {user.id!r}'s history")
                seen.add(item_id)
            given = {k: v for k, v in item.items() if k != "id"}
            unknown = sorted(set(given) - set(fields))
            if unknown:
                raise BadRequest(f"items[{n}] has unknown field(s) {unknown}; {task.name} items have "
                                 f"{', '.join(fields)}")
            missing = [f for f in fields if f not in given]
            if missing:
                raise BadRequest(f"items[{n}] lacks field(s) {missing}; {task.name} items need {', '.join(fields)}")
            for f in fields:
                self._check_text(f"items[{n}].{f}", given[f], limits.max_field_chars)
            if task.labels and task.label_field in given and given[task.label_field].strip() not in task.labels:
                raise BadRequest(f"items[{n}].{task.label_field} {given[task.label_field][:64]!r} is not a "
                                 f"{task.name} label; labels: {', '.join(task.labels)}")
            out.append(({"id": item_id} if item_id else {}) | {f: given[f] for f in fields})
        return out

    @staticmethod
    def check_mode(mode: str) -> str:
        if mode not in ANSWER_MODES:
            raise BadRequest(f"mode {mode!r} is unknown; modes: {', '.join(ANSWER_MODES)}")
        return mode

    # ------------------------------------------------------------------ calls
    def personalize(self, user_id: str, text: str, task: str = "", mode: str = FULL) -> Personalized:
        """HYDRA's answer for `text` from user `user_id`, with what it used."""
        start = time.perf_counter()
        self.check_task(task)
        self.check_user(user_id)
        self.check_mode(mode)
        full = self.full_input(text)
        with self._infer_lock:
            self._refresh_models()
            models = self._models
            stored = self.state.user(user_id)
            query_user = User(id=user_id, input=full, profile=stored.profile)
            pipeline = HydraPipeline(self.task, self.llm, self.retriever, models.reranker, models.adapter,
                                     self.config, self.margin)
            before = self.llm.stats.copy()
            answer = pipeline.answer(query_user, mode)
            used = self.llm.stats.minus(before)
        self.requests_served = next(self._served) + 1
        return Personalized(answer, used, _head(models.reranker, user_id, mode != ADAPTER),
                            _head(models.adapter, user_id, mode != RERANKER), models.version,
                            self.task.name, (time.perf_counter() - start) * 1000)

    def add_history(self, user_id: str, items: list[dict]) -> tuple[list[str], int]:
        """Append `items` to the user's history, durably; returns (their ids, the new history size)."""
        self.check_user(user_id)
        with self._write_lock:
            if self.closed:
                raise RuntimeError("the service is shutting down; the items were not added")
            user = self.state.user(user_id)
            checked = self.check_items(user, items)
            try:
                updated = self.state.add_history(user_id, checked, durable=True)
            except StateError as exc:  # e.g. a made id clashing with a stored one
                raise ItemExists(str(exc)) from None
        self.retriever.forget(user_id)  # the profile changed: drop the old index now, not on next query
        added = updated.profile[len(updated.profile) - len(checked):]
        self.requests_served = next(self._served) + 1
        return [str(i["id"]) for i in added], len(updated.profile)

    def status(self) -> dict:
        models = self._models
        users = []
        for uid, role in self.state.roles.items():
            users.append({"user_id": uid, "role": role, "history_size": len(self.state.user(uid).profile),
                          "reranker_head": bool(models.reranker is not None and models.reranker.has_user(uid)),
                          "adapter_head": bool(models.adapter is not None and models.adapter.has_user(uid))})
        mods = [{"module": m, "version": models.versions[m][0], "saved_at": models.versions[m][1],
                 "heads": len(getattr(models, m).users)} for m in MODULES if m in models.versions]
        return {"task": self.task.name, "users": users, "models": mods, "model_version": models.version,
                "llm_backend": getattr(self.llm, "name", type(self.llm).__name__), "llm": self.llm.stats.copy(),
                "requests_served": self.requests_served}

    def close(self) -> None:
        """Refuse further appends and wait for one in progress to reach the disk."""
        with self._write_lock:
            self.closed = True


def _head(scorer, user_id: str, used: bool) -> str:
    if scorer is None or not used:
        return "none"
    return "user" if scorer.has_user(user_id) else "default"


def _file_version(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
