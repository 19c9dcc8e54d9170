"""The records every part passes around: a LaMP user and a loaded split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .tasks import Task


class DataError(ValueError):
    """A LaMP file is malformed. The message names the file, the item and what is wrong."""


@dataclass
class User:
    """One LaMP user: in LaMP's user-based split each question id is one user with one query.

    `profile` items are dicts with "id" and the task's fields (tasks.PROFILE_FIELDS).
    `gold` is None where the outputs are hidden (LaMP's test split).
    """

    id: str
    input: str
    profile: list[dict]
    gold: str | None = None


@dataclass
class LampSplit:
    """The users of one task and split, read from LaMP's files (or made by the synthetic generator)."""

    task: Task
    users: list[User]
    source: Path | None = None
    meta: dict = field(default_factory=dict)

    def by_id(self) -> dict[str, User]:
        return {u.id: u for u in self.users}
