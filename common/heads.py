"""The per-user parts of HYDRA's scorer: the scoring head, its key, and the frozen-feature cache."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from torch import nn


def head_key(user_id: str) -> str:
    """An injective map from any user id to a valid ModuleDict key (no '.', no clash with attributes)."""
    if not isinstance(user_id, str) or not user_id:
        raise ValueError(f"user id must be a non-empty string, got {user_id!r}")
    return "u_" + "".join(c if (c.isascii() and c.isalnum()) else f"_{ord(c):x}_" for c in user_id)


class ScoringHead(nn.Module):
    """HYDRA's per-user head on the first-token state: dropout → Linear(H,H) → tanh → dropout → Linear(H,2).

    With layers=1 it is dropout → Linear(H,2). nn.Linear's default init is HYDRA's
    (kaiming-uniform a=√5, bias uniform ±1/√fan_in).
    """

    def __init__(self, hidden: int, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        if layers not in (1, 2):
            raise ValueError(f"head_layers must be 1 or 2, got {layers}")
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden, hidden) if layers == 2 else None
        self.out_proj = nn.Linear(hidden, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dropout(features)
        if self.dense is not None:
            x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)


class HiddenCache:
    """Bounded LRU of frozen-part outputs, one [tokens, H] tensor per (query, text) pair."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple[str, str], value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.numel() * old.element_size()
            self._items[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= evicted.numel() * evicted.element_size()

    def hidden(self, enc: dict[str, torch.Tensor], pairs: list[tuple[str, str]], compute) -> torch.Tensor:
        """The frozen states [B, width, H] of a tokenized batch (right-padded): cached rows are reused, the
        others computed in one sub-batch by `compute(enc)` and remembered."""
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        found = [self.get(p) for p in pairs]
        missing = [i for i, h in enumerate(found) if h is None]
        if len(missing) == len(pairs):  # nothing cached: one plain batch, then remember each row
            hidden = compute(enc)
            for i, p in enumerate(pairs):
                self.put(p, hidden[i, : lengths[i]].clone())
            return hidden
        if missing:
            idx = torch.tensor(missing, device=enc["input_ids"].device)
            width = max(lengths[i] for i in missing)
            sub_hidden = compute({k: v.index_select(0, idx)[:, :width] for k, v in enc.items()})
            for j, i in enumerate(missing):
                found[i] = sub_hidden[j, : lengths[i]].clone()
                self.put(pairs[i], found[i])
        hidden = found[0].new_zeros(len(pairs), enc["attention_mask"].shape[1], found[0].shape[-1])
        for i, h in enumerate(found):
            hidden[i, : h.shape[0]] = h
        return hidden

    def stats(self) -> dict:
        return {"entries": len(self), "mb": self.bytes / 2**20, "hits": self.hits, "misses": self.misses}

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)
