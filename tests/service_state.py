"""A small client state folder for the service tests: 4 synthetic LaMP_2M users, tiny HYDRA sizes."""

from __future__ import annotations

import torch

from fedhydra.client.state import ClientState
from fedhydra.common.config import get_config
from fedhydra.common.hydra import HydraModels
from fedhydra.common.records import User
from fedhydra.common.synthetic import make_synthetic

TINY = dict(retrieve=3, k=2, candidates=2, max_length=64, adapter_margin="0.0")  # margin 0: the adapter chooses


def make_state(folder, with_models: bool) -> ClientState:
    """4 synthetic LaMP_2M users; with models, users 0 and 1 have heads of their own."""
    split = make_synthetic("LaMP_2M", n_users=4, seed=7)
    state = ClientState.create(folder, split.task, split.users, role="test")
    cfg = get_config("cpu", **TINY)
    state.save_config(cfg)
    if with_models:
        save_models(state, cfg, [u.id for u in split.users[:2]])
    return state


def save_models(state: ClientState, cfg, head_users: list[str]) -> None:
    """Untrained scorers (seeded) with own heads for `head_users`: the service's behaviour does not need trained ones."""
    models = HydraModels.new(cfg)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        for uid in head_users:
            models.reranker.add_user(uid)
            models.adapter.add_user(uid)
    state.save_models(models)


def content(user: User) -> str:
    """The movie description of a synthetic LaMP_2M query (what an app would send)."""
    return user.input.split("description:", 1)[1].strip()
