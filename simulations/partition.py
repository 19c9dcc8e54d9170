"""Partition LaMP users into federated clients and give each client its private state folder.

Train users and unseen test users are never mixed: train clients hold only train users, test
clients only test users (they join after training to fit their heads and answer their query).
Partitioners: `id` (users sorted by id, dealt out in order) and `profile-size` (users sorted
by history length, so each client holds users with similar amounts of history: a non-IID split).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from fedhydra.common.records import User
from fedhydra.common.tasks import Task

PARTITIONERS = ("id", "profile-size")


@dataclass(frozen=True)
class ClientSpec:
    """One client: its index (Flower's partition-id), role ("train" | "test"), users and state folder."""

    index: int
    role: str
    user_ids: tuple[str, ...]
    state: Path


def partition_users(users: list[User], users_per_client: int = 1, by: str = "id", seed: int = 0) -> list[list[User]]:
    """Groups of `users_per_client` users (the last may be smaller), in a deterministic order."""
    if users_per_client < 1:
        raise ValueError(f"--users-per-client must be at least 1, got {users_per_client}")
    if by not in PARTITIONERS:
        raise ValueError(f"unknown partitioner {by!r}; choose one of {', '.join(PARTITIONERS)}")
    if by == "id":
        ordered = sorted(users, key=lambda u: u.id)
        random.Random(seed).shuffle(ordered)  # ids often encode time or source; don't let them cluster clients
    else:
        ordered = sorted(users, key=lambda u: (len(u.profile), u.id))
    return [ordered[i:i + users_per_client] for i in range(0, len(ordered), users_per_client)]


def prepare_clients(root: str | os.PathLike, task: Task, train_users: list[User], test_users: list[User],
                    users_per_client: int = 1, by: str = "id", seed: int = 0) -> list[ClientSpec]:
    """State folders `root/client-<i>` for the train clients, then the test clients (reused if they exist)."""
    from fedhydra.client.state import ClientState  # torch-heavy; keeps `fedhydra --help` fast

    overlap = {u.id for u in train_users} & {u.id for u in test_users}
    if overlap:
        raise ValueError(f"train and test users overlap: {sorted(overlap)[:5]}")
    specs = []
    for role, users in (("train", train_users), ("test", test_users)):
        for group in partition_users(users, users_per_client, by, seed):
            folder = Path(root) / f"client-{len(specs)}"
            ClientState.create(folder, task, group, role)
            specs.append(ClientSpec(len(specs), role, tuple(u.id for u in group), folder.resolve()))
    return specs
