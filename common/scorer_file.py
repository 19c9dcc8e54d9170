"""A HydraScorer in one safetensors file: config, trainable base, every head, and a fingerprint of the frozen
base so that a file is only ever loaded onto the encoder it was trained on. Writes are atomic."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .files import atomic_path
from .scorer import DEFAULT_HEAD, FEATURE_CACHE_MB, HydraScorer

FORMAT = "fedhydra-scorer/1"


def frozen_fingerprint(model: HydraScorer) -> str:
    """A digest of the frozen base weights."""
    digest = hashlib.sha256()
    trainable = set(model._trainable_names)
    for name, p in model.encoder.named_parameters():
        if name not in trainable:
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save(model: HydraScorer, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {f"shared/{n}": t.contiguous() for n, t in model.shared_state().items()}
    for key, head in model.heads.items():
        for n, t in head.state_dict().items():
            tensors[f"head/{key}/{n}"] = t.detach().cpu().contiguous().clone()
    meta = {"format": FORMAT, "config": json.dumps(model.config()),
            "users": json.dumps(model._user_of_key), "frozen_fingerprint": frozen_fingerprint(model)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load(path: str | os.PathLike, device: str | torch.device | None = None, encoder: str | None = None,
         cache_mb: float = FEATURE_CACHE_MB) -> HydraScorer:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved scorer at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a saved HydraScorer (format {meta.get('format')!r}, want {FORMAT!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    model = HydraScorer(encoder or cfg["encoder"], train_layers=cfg["train_layers"], head_layers=cfg["head_layers"],
                        max_length=cfg["max_length"], dropout=cfg["dropout"], device=device, cache_mb=cache_mb,
                        extra=cfg.get("extra", 0))
    if frozen_fingerprint(model) != meta.get("frozen_fingerprint"):
        raise ValueError(f"{path}: the encoder's frozen weights differ from those it was saved with")
    model.load_shared_state({k[len("shared/"):]: t for k, t in tensors.items() if k.startswith("shared/")})
    users = json.loads(meta["users"])
    for key, uid in [(DEFAULT_HEAD, None), *users.items()]:
        state = {k.split("/", 2)[2]: t for k, t in tensors.items() if k.startswith(f"head/{key}/")}
        if uid is None:
            model.load_default_head_state(state)
        else:
            model.load_personal_state(uid, state)
    return model
