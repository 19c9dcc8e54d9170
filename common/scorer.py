"""HYDRA's factorized scorer: one shared encoder base plus a small head per user (HYDRA.md §2).

score(user, query, text) = softmax(head_user(encoder(query, text)[first token]))[1] = P(positive).

Only the top `train_layers` encoder layers are trainable; they (and the feature weights below) are the
*shared state* that federation averages. Each user's head is the *personal state*. FedHydra's adapter (`extra` > 0) adds
to every head's logits a linear term in `extra` candidate features (common/selection.py), weighed by
`candidate_weights`, which belongs to the shared state: what makes a candidate good on LaMP-7
(closeness to the query, agreement) is shared, and fitting its weights per user on a user's three
pseudo-queries overfits (offline, 100 test users: ROUGE-1 0.390 shared vs 0.375 after 100 per-user steps).
A shared default head (key "__default__") serves users without a fitted head (HYDRA has none; FedHydra
adds it).

The frozen part (embeddings and lower layers) always runs in eval mode (no dropout) and
without autograd, so it is a deterministic feature extractor: its per-pair outputs are cached
in a bounded LRU (`cache_mb`), which is correct in train and eval mode alike. The model stays
Opacus-compatible: heads are plain nn.Linear, there is no pooler, and `train()` puts the
trainable modules in training mode.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from . import settings
from .encoder import check_state, default_encoder_path, layer_out, pick_device, quiet_transformers
from .heads import HiddenCache, ScoringHead, head_key

DEFAULT_HEAD = "__default__"
FEATURE_WEIGHTS = "candidate_weights.weight"  # its key in the shared state
# Frozen-layer outputs kept per scorer: 128 MB holds the cpu preset's pairs (64 MB measured: the same peak RSS).
FEATURE_CACHE_MB = 128


class HydraScorer(nn.Module):
    """Shared encoder base + per-user heads; see the module docstring.

    encoder: an HF encoder folder or name (default: default_encoder_path()). train_layers: how
    many top encoder layers train (0..num_layers). max_length: pair truncation length.
    cache_mb: memory bound of the frozen-output cache (0 disables it).
    """

    def __init__(self, encoder: str | None = None, train_layers: int = 2, head_layers: int = 2,
                 max_length: int = 256, dropout: float | None = None,
                 device: str | torch.device | None = None, cache_mb: float = FEATURE_CACHE_MB, extra: int = 0,
                 feature_lr: float | None = None):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.encoder_name = encoder  # None: the packaged default, resolved again on load
        path = encoder or default_encoder_path()
        with quiet_transformers():  # the "pooler UNEXPECTED" load report is intended, not news
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            try:
                self.encoder = AutoModel.from_pretrained(path, add_pooling_layer=False)
            except TypeError:  # encoders without a pooler do not take the argument
                self.encoder = AutoModel.from_pretrained(path)
        self.tokenizer.padding_side = "right"  # the cache slices rows as [:length]
        n = len(self.layers)
        if not 0 <= train_layers <= n:
            raise ValueError(f"train_layers={train_layers} must be between 0 and the encoder's {n} layers")
        if max_length < 8:
            raise ValueError(f"max_length={max_length} is too small (at least 8 tokens)")
        self.train_layers, self.head_layers, self.max_length = train_layers, head_layers, max_length
        self.extra = extra  # candidate features added to every head's logits (0: none, HYDRA)
        self.hidden_size = int(self.encoder.config.hidden_size)
        self.dropout_p = float(getattr(self.encoder.config, "hidden_dropout_prob", 0.1) if dropout is None else dropout)

        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.top_layers = list(self.layers)[n - train_layers:]
        for layer in self.top_layers:
            for p in layer.parameters():
                p.requires_grad_(True)
        top_ids = {id(p) for layer in self.top_layers for p in layer.parameters()}
        self._trainable_names = [name for name, p in self.encoder.named_parameters() if id(p) in top_ids]

        self.candidate_weights = nn.Linear(extra, 2, bias=False) if extra else None
        if self.candidate_weights is not None:
            nn.init.zeros_(self.candidate_weights.weight)  # starts as HYDRA's scorer: the encoder's judgement only
            # The few feature weights must travel far (a closeness weight of about 5 log-odds ranks LaMP-7
            # candidates like the closest-to-the-query rule), and Adam moves a weight by about lr per step, so they
            # train at their own learning rate (setting feature-lr), without weight decay (training.param_groups).
            self.candidate_weights.fixed_lr = settings.SETTINGS["feature-lr"].default if feature_lr is None \
                else feature_lr
        self.listwise_loss = "risk"  # examples.batch_loss's listwise loss: the run's setting (hydra.use_run_settings)
        self.heads = nn.ModuleDict()
        self._user_of_key: dict[str, str] = {}
        self.heads[DEFAULT_HEAD] = self._new_head()

        self.device = pick_device(device)
        self.to(self.device)
        self._cache = HiddenCache(int(cache_mb * 2**20)) if cache_mb > 0 else None
        self._split = self._check_split_forward()
        if not self._split:
            self._cache = None
        self.train()  # from_pretrained leaves the encoder in eval mode (STACK.md §6 pitfall 1)

    # ---------- structure ----------
    @property
    def layers(self) -> nn.ModuleList:
        """The encoder's layer list (looked up, not stored, so it is not registered twice)."""
        for path in ("encoder.layer", "transformer.layer", "layers", "encoder.layers"):
            obj = self.encoder
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, nn.ModuleList) and len(obj) > 0:
                return obj
        raise ValueError(f"cannot find the layer list of encoder {type(self.encoder).__name__}")

    def _new_head(self) -> ScoringHead:
        head = ScoringHead(self.hidden_size, self.head_layers, self.dropout_p)
        return head.to(self.device) if hasattr(self, "device") else head

    def train(self, mode: bool = True) -> "HydraScorer":
        """Trainable layers and heads follow `mode`; the frozen encoder part always stays in eval mode."""
        super().train(mode)
        if mode:
            self.encoder.eval()
            for layer in self.top_layers:
                layer.train()
        return self

    # ---------- users ----------
    @property
    def users(self) -> list[str]:
        """User ids that have a head of their own."""
        return list(self._user_of_key.values())

    def has_user(self, user_id: str) -> bool:
        return head_key(user_id) in self._user_of_key

    def add_user(self, user_id: str, replace: bool = False, from_default: bool = False) -> ScoringHead:
        """A new head for `user_id`: a copy of the default head (`from_default`, FedHydra's warm start) or
        randomly initialised (HYDRA; deterministic under torch.manual_seed)."""
        key = head_key(user_id)
        if key in self._user_of_key and not replace:
            raise ValueError(f"user {user_id!r} already has a head (pass replace=True to re-initialise it)")
        self.heads[key] = self._new_head()
        if from_default:
            self.heads[key].load_state_dict(self.heads[DEFAULT_HEAD].state_dict())
        self.heads[key].train(self.training)
        self._user_of_key[key] = user_id
        return self.heads[key]

    def remove_user(self, user_id: str) -> None:
        """Drop the user's own head (if any): the user then answers with the default head."""
        key = head_key(user_id)
        if key in self._user_of_key:
            del self.heads[key], self._user_of_key[key]

    def head(self, user_id: str | None) -> ScoringHead:
        """The user's head, or the default head when the user has none (or user_id is None)."""
        if user_id is None:
            return self.heads[DEFAULT_HEAD]
        key = head_key(user_id)
        return self.heads[key] if key in self._user_of_key else self.heads[DEFAULT_HEAD]

    # ---------- federation state ----------
    def shared_modules(self) -> list[nn.Module]:
        """What trains in the shared base: the top encoder layers and the candidate-feature weights."""
        return self.top_layers + ([self.candidate_weights] if self.candidate_weights is not None else [])

    def shared_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable base parameters by their shared-state name."""
        params = dict(self.encoder.named_parameters())
        out = {n: params[n] for n in self._trainable_names}
        if self.candidate_weights is not None:
            out[FEATURE_WEIGHTS] = self.candidate_weights.weight
        return out

    def trainable_base_parameters(self) -> list[nn.Parameter]:
        return list(self.shared_parameters().values())

    def shared_state(self) -> dict[str, torch.Tensor]:
        """Exactly the trainable base parameters (top layers, feature weights), as detached CPU copies."""
        return {n: p.detach().cpu().clone() for n, p in self.shared_parameters().items()}

    def load_shared_state(self, state: dict[str, torch.Tensor]) -> None:
        """Overwrite the trainable base parameters; heads are untouched. Keys and shapes must match exactly."""
        params = self.shared_parameters()
        check_state("shared state", state, params)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(torch.as_tensor(state[name]).to(p.device, p.dtype))

    def personal_state(self, user_id: str) -> dict[str, torch.Tensor]:
        """The user's head parameters (KeyError if the user has no head)."""
        key = head_key(user_id)
        if key not in self._user_of_key:
            raise KeyError(f"user {user_id!r} has no head")
        return {n: t.detach().cpu().clone() for n, t in self.heads[key].state_dict().items()}

    def load_personal_state(self, user_id: str, state: dict[str, torch.Tensor]) -> None:
        """Set the user's head (created if missing); no base weight changes."""
        if not self.has_user(user_id):
            self.add_user(user_id)
        self._load_head(self.heads[head_key(user_id)], state, f"personal state of {user_id!r}")

    def default_head_state(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().clone() for n, t in self.heads[DEFAULT_HEAD].state_dict().items()}

    def load_default_head_state(self, state: dict[str, torch.Tensor]) -> None:
        self._load_head(self.heads[DEFAULT_HEAD], state, "default head state")

    @staticmethod
    def _load_head(head: ScoringHead, state: dict[str, torch.Tensor], what: str) -> None:
        check_state(what, state, head.state_dict())
        with torch.no_grad():
            for name, t in head.state_dict().items():
                t.copy_(torch.as_tensor(state[name]).to(t.device, t.dtype))

    # ---------- forward ----------
    def tokenize(self, queries: list[str], texts: list[str]) -> dict[str, torch.Tensor]:
        if len(queries) != len(texts):
            raise ValueError(f"{len(queries)} queries but {len(texts)} texts")
        for s in (*queries, *texts):
            if not isinstance(s, str):
                raise TypeError(f"queries and texts must be strings, got {type(s).__name__}")
        enc = self.tokenizer(queries, texts, truncation=True, max_length=self.max_length,
                             padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def _frozen_hidden(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings + lower layers, no autograd, eval mode (the encoder's frozen modules never train)."""
        from transformers.masking_utils import create_bidirectional_mask

        with torch.no_grad():
            kwargs = {"input_ids": enc["input_ids"]}
            if "token_type_ids" in enc:
                kwargs["token_type_ids"] = enc["token_type_ids"]
            hidden = self.encoder.embeddings(**kwargs)
            lower = list(self.layers)[: len(self.layers) - self.train_layers]
            if lower:
                mask = create_bidirectional_mask(self.encoder.config, hidden, enc["attention_mask"])
                for layer in lower:
                    hidden = layer_out(layer(hidden, mask))
        return hidden

    def encode(self, queries: list[str], texts: list[str]) -> torch.Tensor:
        """First-token states [B, H] of the (query, text) pairs; gradients flow into the top layers only."""
        enc = self.tokenize(queries, texts)
        if not self._split:
            return self.encoder(**enc).last_hidden_state[:, 0]
        from transformers.masking_utils import create_bidirectional_mask

        cache = self._cache
        hidden = (self._frozen_hidden(enc) if cache is None
                  else cache.hidden(enc, list(zip(queries, texts)), self._frozen_hidden))
        if self.top_layers:
            mask = create_bidirectional_mask(self.encoder.config, hidden, enc["attention_mask"])
            for layer in self.top_layers:
                hidden = layer_out(layer(hidden, mask))
        return hidden[:, 0]

    def extra_tensor(self, extra) -> torch.Tensor | None:
        """Candidate features as a float tensor on the model's device (None when the heads take none)."""
        if not self.extra:
            return None
        if extra is None:
            raise ValueError(f"this scorer needs {self.extra} candidate features per text")
        t = torch.as_tensor(extra, dtype=torch.float32, device=self.device)
        if t.numel() == 0:
            return t.reshape(0, self.extra)
        if t.ndim != 2 or t.shape[1] != self.extra:
            raise ValueError(f"this scorer needs {self.extra} candidate features per text, got shape {tuple(t.shape)}")
        return t

    def feature_logits(self, extra: torch.Tensor | None, rows: int) -> torch.Tensor | float:
        """The candidate-feature term of `rows` rows' logits (0. for a scorer without features)."""
        if not self.extra:
            return 0.0
        if extra is None or extra.shape != (rows, self.extra):
            raise ValueError(f"this scorer needs {self.extra} candidate features per row")
        return self.candidate_weights(extra)

    def head_logits(self, features: torch.Tensor, user_ids: list[str | None]) -> torch.Tensor:
        """Head logits [B, 2]: row i through user_ids[i]'s head (the default head for unknown users or None),
        without the feature term."""
        if len(user_ids) != features.shape[0]:
            raise ValueError(f"{len(user_ids)} user ids for {features.shape[0]} rows")
        groups: dict[int, tuple[ScoringHead, list[int]]] = {}
        for i, uid in enumerate(user_ids):
            head = self.head(uid)
            groups.setdefault(id(head), (head, []))[1].append(i)
        if len(groups) == 1:
            return next(iter(groups.values()))[0](features)
        out = features.new_zeros(features.shape[0], 2)
        for head, rows in groups.values():
            idx = torch.tensor(rows, device=features.device)
            out = out.index_copy(0, idx, head(features.index_select(0, idx)))
        return out

    def forward(self, user_ids: list[str | None], queries: list[str], texts: list[str], extra=None) -> torch.Tensor:
        """Logits [B, 2] for a batch whose rows may belong to different users."""
        return (self.head_logits(self.encode(queries, texts), user_ids)
                + self.feature_logits(self.extra_tensor(extra), len(texts)))

    @torch.no_grad()
    def logits(self, user_id: str, query: str, texts: list[str], extra=None, batch_size: int = 32) -> torch.Tensor:
        """Logits [len(texts), 2] of each (query, text) with the user's head (the default head for an unknown user)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        extra = self.extra_tensor(extra)
        was_training = self.training
        self.eval()
        try:
            head, chunks = self.head(user_id), []
            for start in range(0, len(texts), batch_size):
                chunk = list(texts[start:start + batch_size])
                sub = None if extra is None else extra[start:start + batch_size]
                chunks.append((head(self.encode([query] * len(chunk), chunk))
                               + self.feature_logits(sub, len(chunk))).float())
            return torch.cat(chunks) if chunks else torch.zeros(0, 2)
        finally:
            self.train(was_training)

    def score(self, user_id: str, query: str, texts: list[str], extra=None, batch_size: int = 32) -> list[float]:
        """P(positive) of each (query, text)."""
        return torch.softmax(self.logits(user_id, query, texts, extra, batch_size), dim=-1)[:, 1].tolist()

    def log_odds(self, user_id: str, query: str, texts: list[str], extra=None, batch_size: int = 32) -> list[float]:
        """log P(positive) - log P(negative) of each (query, text): the adapter's ranking score."""
        logits = self.logits(user_id, query, texts, extra, batch_size)
        return (logits[:, 1] - logits[:, 0]).tolist()

    def cache_stats(self) -> dict:
        return {"enabled": False} if self._cache is None else {"enabled": True, **self._cache.stats()}

    def clear_cache(self) -> None:
        if self._cache is not None:
            self._cache.clear()

    def _check_split_forward(self) -> bool:
        """Running layers one by one must reproduce the encoder's own forward; else use the plain forward."""
        was_training = self.training
        self.eval()
        try:
            enc = self.tokenize(["a short query", "probe"], ["a somewhat longer text to pad the pair", "x"])
            with torch.no_grad():
                ref = self.encoder(**enc).last_hidden_state[:, 0]
                self._split, cache, self._cache = True, self._cache, None
                got = self.encode(["a short query", "probe"], ["a somewhat longer text to pad the pair", "x"])
                self._cache = cache
            ok = torch.allclose(ref, got, atol=1e-4, rtol=1e-4)
        except Exception as exc:  # an encoder whose layers take other arguments
            warnings.warn(f"layer-by-layer forward unsupported for this encoder ({exc}); frozen-output cache off")
            ok = False
        finally:
            self.train(was_training)
        if not ok:
            warnings.warn("layer-by-layer forward differs from the encoder's forward; frozen-output cache off")
        return ok

    # ---------- persistence (common/scorer_file.py) ----------
    def config(self) -> dict:
        return {"encoder": self.encoder_name, "train_layers": self.train_layers, "head_layers": self.head_layers,
                "max_length": self.max_length, "dropout": self.dropout_p, "extra": self.extra}

    def save(self, path: str | os.PathLike) -> None:
        """Write config, trainable base, all heads and a frozen-base fingerprint to one safetensors file, atomically."""
        from .scorer_file import save

        save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None,
             encoder: str | None = None, cache_mb: float = FEATURE_CACHE_MB) -> "HydraScorer":
        """A scorer saved by save(); `encoder` overrides the saved encoder location (same weights required)."""
        from .scorer_file import load

        return load(path, device=device, encoder=encoder, cache_mb=cache_mb)
