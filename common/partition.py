"""Which users a run uses and which client holds which of them: pure functions of the settings.

Train users and unseen test users are never mixed: partitions 0..clients-1 are train clients,
the next test-clients partitions hold test users (they join after training to fit their heads and
answer their query). Partitioners: `id` (users dealt out at random) and `profile-size` (users sorted
by history length, so each client holds users with similar amounts of history: a non-IID split).
A simulated client computes its own partition from these functions, as Flower's examples do with
their datasets; a deployed client is given its own state folder instead.
"""

from __future__ import annotations

import random

from .data import load_split, split_users
from .records import LampSplit, User

PARTITIONERS = ("id", "profile-size")
SYNTHETIC_TASK = "LaMP_2M"  # the task of the synthetic users when the task setting is ''


def users_task(values: dict) -> str:
    """The task that picks the users: '' for a data folder (its content decides it), else the synthetic task."""
    return "" if values["data"] else (values["task"] or SYNTHETIC_TASK)


def load_users(values: dict) -> LampSplit:
    """The split the `data` and `task` settings name (synthetic users when `data` is ''), checked against `task`."""
    if values["data"]:
        split = load_split(values["data"])
        if values["task"] and values["task"] != split.task.name:
            raise ValueError(f"task {values['task']} but {values['data']} holds {split.task.name}")
        return split
    from .synthetic import make_synthetic

    n = (int(values["clients"]) + int(values["test-clients"])) * int(values["users-per-client"])
    return make_synthetic(users_task(values), n_users=n, seed=int(values["seed"]))


def partition_users(users: list[User], users_per_client: int = 1, by: str = "id", seed: int = 0) -> list[list[User]]:
    """Groups of `users_per_client` users (the last may be smaller), in a deterministic order."""
    if users_per_client < 1:
        raise ValueError(f"users-per-client must be at least 1, got {users_per_client}")
    if by not in PARTITIONERS:
        raise ValueError(f"unknown partitioner {by!r}; choose one of {', '.join(PARTITIONERS)}")
    if by == "id":
        ordered = sorted(users, key=lambda u: u.id)
        random.Random(seed).shuffle(ordered)  # ids often encode time or source; don't let them cluster clients
    else:
        ordered = sorted(users, key=lambda u: (len(u.profile), u.id))
    return [ordered[i:i + users_per_client] for i in range(0, len(ordered), users_per_client)]


def federated_split(split: LampSplit, values: dict) -> list[tuple[str, list[User]]]:
    """(role, users) of every partition: the train clients first, then the test clients."""
    clients, test_clients, k = int(values["clients"]), int(values["test-clients"]), int(values["users-per-client"])
    if clients < 1 or test_clients < 0:
        raise ValueError(f"clients ({clients}) must be at least 1 and test-clients ({test_clients}) at least 0")
    train, test = split_users(split.users, clients * k, test_clients * k, int(values["seed"]))
    by, seed = values["partitioner"], int(values["seed"])
    return ([("train", g) for g in partition_users(train, k, by, seed)]
            + [("test", g) for g in partition_users(test, k, by, seed)])
