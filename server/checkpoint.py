"""The server's checkpoint after every completed round: shared arrays, strategy state, round, history.

    OUT/checkpoint/round-<r>.safetensors   the shared arrays of both modules after round r, and the state
                                           of the strategy of the module trained in round r ("strategy/...")
    OUT/checkpoint/progress.json           {"round": r, "weights": "round-<r>.safetensors",
                                            "fingerprint": ..., "history": [...], "privacy": ledger}

progress.json is the commit point: it is replaced atomically only after the weights it names are
completely on disk, and older weight files are removed after that, so a server killed at any moment
resumes from a complete round. The privacy ledger (dp=user: Flower's RdpAccountant state, JSON) is
committed in the same progress.json as the round it accounts for, so a resumed run continues the same
ledger. Client sampling is derived from (seed, round), so nothing else is needed to continue exactly.
A checkpoint made under other settings (privacy settings included) is refused (the fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from fedhydra.common import settings
from fedhydra.common.files import atomic_path, write_atomic

PROGRESS = "progress.json"
STRATEGY = "strategy/"
# Settings that do not change what a run computes (tagged run-free in the table): a resume may change them.
FREE_SETTINGS = settings.tagged("run-free")


def fingerprint(values: dict) -> str:
    """What a checkpoint must match to be continued: every setting but FREE_SETTINGS."""
    keep = {k: v for k, v in sorted(values.items()) if k not in FREE_SETTINGS}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save(folder: str | os.PathLike, server_round: int, arrays: dict[str, np.ndarray], fingerprint: str,
         history: list[dict], strategy_state: dict[str, np.ndarray] | None = None, privacy: dict | None = None) -> None:
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"round-{server_round}.safetensors"
    tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    tensors |= {STRATEGY + k: np.ascontiguousarray(v) for k, v in (strategy_state or {}).items()}
    with atomic_path(folder / name) as tmp:
        save_file(tensors, str(tmp))
    progress = {"round": server_round, "weights": name, "fingerprint": fingerprint, "history": history}
    if privacy is not None:
        progress["privacy"] = privacy
    write_atomic(folder / PROGRESS, json.dumps(progress, indent=1) + "\n")
    for old in folder.glob("round-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load(folder: str | os.PathLike, fingerprint: str):
    """(last completed round, shared arrays, strategy state, history), or None when there is no checkpoint.
    A checkpoint of a different configuration is refused rather than silently continued."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    path = folder / PROGRESS
    if not path.is_file():
        return None
    progress = json.loads(path.read_text(encoding="utf-8"))
    if progress.get("fingerprint") != fingerprint:
        raise ValueError(f"the checkpoint in {folder} is from a run with other settings "
                         "(task, sizes, strategy, rounds, seed or privacy); use another out folder or drop resume")
    tensors = load_file(str(folder / progress["weights"]))
    shared = {k: v for k, v in tensors.items() if not k.startswith(STRATEGY)}
    state = {k[len(STRATEGY):]: v for k, v in tensors.items() if k.startswith(STRATEGY)}
    return int(progress["round"]), shared, state, list(progress["history"])


def load_privacy(folder: str | os.PathLike) -> dict | None:
    """The privacy ledger committed with the last completed round (None: no checkpoint, or a run without one)."""
    path = Path(folder) / PROGRESS
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("privacy")
