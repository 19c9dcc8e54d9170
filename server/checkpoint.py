"""The server's checkpoint after every completed round: shared arrays, round number, history.

    OUT/checkpoint/shared-round-<r>.safetensors   the aggregated shared arrays after round r
    OUT/checkpoint/progress.json                  {"round": r, "weights": "shared-round-<r>.safetensors",
                                                   "fingerprint": ..., "history": [...]}

progress.json is the commit point: it is replaced atomically only after the weights it names
are completely on disk, and older weight files are removed after that, so a server killed at
any moment resumes from a complete round. FedAvg keeps no state beyond the arrays, and client
sampling is derived from (seed, round), so nothing else is needed to continue exactly.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from fedhydra.common.files import write_atomic

PROGRESS = "progress.json"


def save(folder: str | os.PathLike, server_round: int, arrays: dict[str, torch.Tensor], fingerprint: str,
         history: list[dict]) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"shared-round-{server_round}.safetensors"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in arrays.items()}, tmp)
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    progress = {"round": server_round, "weights": name, "fingerprint": fingerprint, "history": history}
    write_atomic(folder / PROGRESS, json.dumps(progress, indent=1) + "\n")
    for old in folder.glob("shared-round-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load(folder: str | os.PathLike, fingerprint: str) -> tuple[int, dict[str, torch.Tensor], list[dict]] | None:
    """(last completed round, its shared arrays, history), or None when there is no checkpoint.
    A checkpoint of a different run configuration is refused rather than silently continued."""
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / PROGRESS
    if not path.is_file():
        return None
    progress = json.loads(path.read_text(encoding="utf-8"))
    if progress.get("fingerprint") != fingerprint:
        raise ValueError(f"the checkpoint in {folder} is from a run with another configuration "
                         "(task, rounds, sizes or seed); use another --out or drop --resume")
    return int(progress["round"]), load_file(str(folder / progress["weights"])), list(progress["history"])
