"""A client's private state: one folder that never leaves the client's machine.

    STATE/
      client.json                 format, task, the users it holds (id -> role "train" | "test"), and the
                                  origin of a partition's folder (data, seed, partitioner, client counts,
                                  partition id): a run with other settings is refused, never silently reused
      history/<user>.json         one LaMP user: query input, gold (None when unknown), profile items
      models/reranker.safetensors HydraScorer.save(): last shared base received + every head + default head
      models/adapter.safetensors
      config.json                 the HydraConfig the models were trained with (sizes, prompt style, seed)
      labels/<module>.json        training examples made from LLM feedback, with the key of what they
                                  depend on (config, and the reranker for adapter labels); reused while it matches
      llm-cache/                  the client's own LLM response cache (SQLite)
      answers.jsonl               the last evaluation's answers to its test users (id, prediction, gold): they stay
                                  here; only metric sums go to the server (a simulation's harness reads them for
                                  paired intervals, as the owner of every simulated device)
      privacy.json                record-level DP ledger (client/privacy_ledger.py): the plan and the
                                  Opacus accountant's state, so epsilon accumulates across rounds and restarts

Every file is written atomically (temporary file, then rename), so a client killed at any
moment restarts from its last complete state. A federated client, the simulation harness and
the on-device gRPC service all read and write this one layout through `ClientState`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict
from pathlib import Path

from fedhydra.common.config import HydraConfig
from fedhydra.common.examples import CandidateGroup, ScoredExample
from fedhydra.common.files import write_atomic
from fedhydra.common.hydra import HydraModels
from fedhydra.common.partition import users_task
from fedhydra.common.protocol import MODULES
from fedhydra.common.scorer import HydraScorer
from fedhydra.common.records import User
from fedhydra.common.tasks import PROFILE_FIELDS, Task, get_task

FORMAT = "fedhydra-client/1"
ROLES = ("train", "test")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class StateError(ValueError):
    """A client state folder is missing, malformed, or asked for something it does not hold."""


# The settings that decide which users a partition holds (common/partition.py), and so a state folder's content.
ORIGIN_KEYS = ("data", "seed", "partitioner", "clients", "test-clients", "users-per-client")


def partition_origin(values: dict, partition_id: int) -> dict:
    """What a partition's state folder is made from: the settings that pick its users, the data's content."""
    return {"task": users_task(values), **{k: values[k] for k in ORIGIN_KEYS},
            "data-sha256": _data_digest(str(values["data"])), "partition-id": int(partition_id)}


def check_origin(folder: Path, stored: dict | None, origin: dict) -> None:
    """Refuse a state folder made from other settings than `origin`, naming the first that differs."""
    if stored is None:
        raise StateError(f"{folder} holds client state that records no origin (an older FedHydra made it); "
                         "delete it, or give another out/state-root, to start fresh")
    for key, value in origin.items():
        if stored.get(key) != value:
            raise StateError(f"{folder} holds another run's users: it was made with {key}={stored.get(key)!r}, this "
                             f"run has {key}={value!r}. Delete that folder (it holds that run's heads and history) "
                             "or give another --out / state-root to start fresh")


_DIGESTS: dict[tuple, str] = {}


def _data_digest(data: str) -> str:
    """sha256 over a LaMP folder's (or file's) JSON files; '' for synthetic data (its settings define it)."""
    if not data:
        return ""
    root = Path(data)
    files = sorted(root.glob("*.json")) if root.is_dir() else [root]
    key = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file())
    if key not in _DIGESTS:  # a client answers several messages per run: hash each file once per process
        digest = hashlib.sha256()
        for name, _, _ in key:
            digest.update(Path(name).name.encode())
            digest.update(Path(name).read_bytes())
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def check_user_id(user_id: str) -> str:
    """User ids name files in the state folder: letters, digits, '.', '_' and '-' only."""
    if not isinstance(user_id, str) or not _SAFE_ID.match(user_id) or user_id in (".", ".."):
        raise StateError(f"bad user id {user_id!r}: use 1-128 letters, digits, '.', '_' or '-'")
    return user_id


class ClientState:
    """Read and write one client's private folder (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        meta_path = self.folder / "client.json"
        if not meta_path.is_file():
            raise StateError(f"{self.folder} is not a FedHydra client state folder (no client.json); "
                             "create one with ClientState.create or `fedhydra simulate`/`deploy`")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise StateError(f"{meta_path} is not valid JSON ({exc})") from exc
        if meta.get("format") != FORMAT:
            raise StateError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        self.task: Task = get_task(meta["task"])
        self.roles: dict[str, str] = dict(meta["users"])
        self.origin: dict | None = meta.get("origin")

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, folder: str | os.PathLike, task: Task, users: list[User], role: str,
               origin: dict | None = None) -> "ClientState":
        """A new state folder holding `users` (all with `role`), or the existing one if it holds exactly them.
        `origin` (partition_origin) records what a partition's folder was made from."""
        if role not in ROLES:
            raise StateError(f"role {role!r} must be one of {ROLES}")
        folder = Path(folder).expanduser()
        roles = {check_user_id(u.id): role for u in users}
        if (folder / "client.json").is_file():
            state = cls(folder)
            if state.task.name != task.name or state.roles != roles:
                raise StateError(f"{folder} already holds other users or another task; use a fresh folder")
            if origin is not None:
                check_origin(folder, state.origin, origin)
            return state
        for user in users:
            _write_user(folder / "history" / f"{user.id}.json", user)
        write_atomic(folder / "client.json",
                     json.dumps({"format": FORMAT, "task": task.name, "users": roles,
                                 **({"origin": origin} if origin is not None else {})}, indent=1) + "\n")
        return cls(folder)

    # ------------------------------------------------------------------ users and history
    def user_ids(self, role: str | None = None) -> list[str]:
        return [u for u, r in self.roles.items() if role is None or r == role]

    def user(self, user_id: str) -> User:
        if user_id not in self.roles:
            raise StateError(f"user {user_id!r} is not held by the client at {self.folder}")
        path = self.folder / "history" / f"{user_id}.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise StateError(f"cannot read {path}: {exc}") from exc
        return User(id=raw["id"], input=raw["input"], profile=raw["profile"], gold=raw.get("gold"))

    def users(self, role: str | None = None) -> list[User]:
        return [self.user(u) for u in self.user_ids(role)]

    def add_history(self, user_id: str, items: list[dict], durable: bool = False) -> User:
        """Append profile items (each with the task's fields; an "id" is made when absent); atomic.
        durable=True also flushes the file to disk before returning (the gRPC service acknowledges
        an append only then, so it survives a crash, not just a clean exit)."""
        user = self.user(user_id)
        fields = PROFILE_FIELDS[self.task.name]
        known = {str(i["id"]) for i in user.profile}
        added = []
        for n, item in enumerate(items):
            missing = [f for f in fields if not isinstance(item.get(f), str) or not item[f].strip()]
            if missing:
                raise StateError(f"history item {n} for user {user_id!r} lacks text field(s) {missing}")
            item = {"id": str(item.get("id") or f"{user_id}-h{len(user.profile) + len(added)}"),
                    **{f: item[f] for f in fields}}
            if item["id"] in known:
                raise StateError(f"history item id {item['id']!r} already exists for user {user_id!r}")
            known.add(item["id"])
            added.append(item)
        user.profile = user.profile + added
        path = self.folder / "history" / f"{user_id}.json"
        _write_user(path, user, durable)
        return user

    # ------------------------------------------------------------------ models, labels, LLM cache
    def model_path(self, module: str) -> Path:
        if module not in MODULES:
            raise StateError(f"unknown module {module!r}; modules: {MODULES}")
        return self.folder / "models" / f"{module}.safetensors"

    def has_models(self) -> bool:
        return all(self.model_path(m).is_file() for m in MODULES)

    def load_models(self, device: str | None = None, encoder: str | None = None) -> HydraModels | None:
        """The saved reranker and adapter (base + heads), or None before the first save."""
        if not self.has_models():
            return None
        reranker, adapter = (HydraScorer.load(self.model_path(m), device=device, encoder=encoder)
                             for m in MODULES)
        return HydraModels(reranker, adapter)

    def save_models(self, models: HydraModels) -> None:
        for module in MODULES:
            getattr(models, module).save(self.model_path(module))

    def config(self) -> HydraConfig | None:
        path = self.folder / "config.json"
        if not path.is_file():
            return None
        return HydraConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def save_config(self, cfg: HydraConfig) -> None:
        write_atomic(self.folder / "config.json", json.dumps(cfg.as_dict(), indent=1) + "\n")

    def labels(self, module: str, key: str) -> list | None:
        """The cached examples of `module` if they were made under `key`, else None."""
        path = self.folder / "labels" / f"{module}.json"
        if not path.is_file():
            return None
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("key") != key:
            return None
        return [CandidateGroup(**r) if "texts" in r else ScoredExample(**r) for r in raw["examples"]]

    def save_labels(self, module: str, key: str, examples: list) -> None:
        self.model_path(module)  # validates the name
        rows = [asdict(e) for e in examples]
        write_atomic(self.folder / "labels" / f"{module}.json",
                     json.dumps({"key": key, "examples": rows}, ensure_ascii=False) + "\n")

    @property
    def answers_path(self) -> Path:
        return self.folder / "answers.jsonl"

    def answers(self) -> list[dict] | None:
        """The last evaluation's answers ({id, prediction, gold} per test user), or None before any."""
        if not self.answers_path.is_file():
            return None
        return [json.loads(line) for line in self.answers_path.read_text(encoding="utf-8").splitlines() if line]

    def save_answers(self, rows: list[dict]) -> None:
        write_atomic(self.answers_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    @property
    def llm_cache_dir(self) -> Path:
        return self.folder / "llm-cache"

    @property
    def privacy_ledger_path(self) -> Path:
        return self.folder / "privacy.json"

    def __repr__(self) -> str:
        return f"ClientState({str(self.folder)!r}, task={self.task.name}, users={len(self.roles)})"


def _write_user(path: Path, user: User, durable: bool = False) -> None:
    raw = {"id": user.id, "input": user.input, "gold": user.gold, "profile": user.profile}
    write_atomic(path, json.dumps(raw, ensure_ascii=False) + "\n", durable=durable)
