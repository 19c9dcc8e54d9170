"""HYDRA's configuration for one run: the resolved `hydra` settings (common/settings.py) with the
preset's sizes filled in.

Presets hold only sizes. `paper` keeps HYDRA's published ones (HYDRA.md §1–§3: 10 pseudo-queries
per user, M=10 retrieved, B=8 candidates, AdamW lr 2e-5, 2 epochs, batch 64). `cpu` shrinks what
costs LLM calls, the dominant cost on a 2-core machine without a GPU, and raises the head learning
rate because fresh heads trained on a few dozen examples barely move at 2e-5. `fit-epochs` is its own
setting (the fit stage trains heads on features computed once, so its epochs cost little); 10 instead of 3
changed nothing measurable on LaMP-7 (hydra 0.3764 vs 0.3774, 100 test users, feature lr scale 30), so
both presets keep HYDRA's choice of the train stage's epochs. Every run records the resolved config in its results.
"""

from __future__ import annotations

from dataclasses import asdict, field, fields, make_dataclass, replace

from . import settings
from .protocol import MODULES

PRESETS: dict[str, dict[str, settings.Value]] = {
    "paper": {"pseudo-queries": 10, "retrieve": 10, "candidates": 8, "max-length": 256, "epochs": 2, "fit-epochs": 2,
              "lr": 2e-5, "head-lr": 2e-5, "batch-size": 64},
    "cpu": {"pseudo-queries": 3, "retrieve": 6, "candidates": 6, "max-length": 128, "epochs": 3, "fit-epochs": 3,
            "lr": 5e-5, "head-lr": 1e-3, "batch-size": 32},
}
MARGIN_OFF = "off"
MARGIN_AUTO = "auto"


class _HydraConfigRules:
    """Validation and views of HydraConfig; its fields come from the settings table (see HydraConfig below)."""

    def __post_init__(self):
        if not 1 <= self.k <= self.retrieve:
            raise ValueError(f"k={self.k} must be between 1 and retrieve (M)={self.retrieve}")
        if self.pseudo_queries < 1 or self.candidates < 1:
            raise ValueError("pseudo-queries and candidates must be at least 1")
        if not 0.0 < self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature} must be in (0, 2]")
        if self.adapter_label_queries < 0:
            raise ValueError("adapter-label-queries must be >= 0")
        if self.fit_min_queries < 0:
            raise ValueError("fit-min-queries must be >= 0")
        self.margin  # validates adapter_margin

    @property
    def margin(self) -> float | str:
        """adapter-margin as MARGIN_OFF, MARGIN_AUTO or a number >= 0."""
        if self.adapter_margin in (MARGIN_OFF, MARGIN_AUTO):
            return self.adapter_margin
        try:
            value = float(self.adapter_margin)
        except ValueError:
            value = -1.0
        if not value >= 0.0:
            raise ValueError(f"adapter-margin must be auto, off or a number >= 0, got {self.adapter_margin!r}")
        return value

    @property
    def fit_modules(self) -> tuple[str, ...]:
        """The scorers (protocol.MODULES names, in training order) whose new users' heads the fit stage fits."""
        return {"both": MODULES, "none": ()}.get(self.fit_heads, (self.fit_heads,))

    @property
    def style_or_none(self) -> str | None:
        return self.style or None

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_settings(cls, values: dict):
        """From resolved settings (any superset of the `hydra` group plus `seed`); 0-valued sizes take the preset's."""
        preset = str(values.get("preset", settings.SETTINGS["preset"].default))
        if preset == "auto":
            import torch

            preset = "paper" if torch.cuda.is_available() else "cpu"
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        hydra = settings.resolve({k: v for k, v in values.items()
                                  if k in settings.SETTINGS and settings.SETTINGS[k].group == "hydra"},
                                 groups=("hydra",))
        for key, value in PRESETS[preset].items():
            if not hydra[key]:
                hydra[key] = value
        kw = {k.replace("-", "_"): v for k, v in hydra.items()}
        kw["preset"] = preset
        kw["seed"] = int(values.get("seed", 0))
        return cls(**kw)

    @classmethod
    def from_dict(cls, doc: dict):
        """What as_dict() wrote (e.g. a client state's config.json). A field the file lacks (a setting added after it
        was written) takes the setting's default under the file's preset, so an older state still loads."""
        names = {f.name for f in fields(cls)}
        given = {k: v for k, v in doc.items() if k in names}
        if names <= given.keys():
            return cls(**given)
        defaults = cls.from_settings({"preset": given.get("preset", settings.SETTINGS["preset"].default),
                                      "seed": given.get("seed", 0)})
        return replace(defaults, **given)


# One field per `hydra` setting (name and type from common/settings.py, so nothing is declared twice), plus the seed
# and one switch that is no setting. Sizes hold the preset's value once resolved (from_settings).
HydraConfig = make_dataclass(
    "HydraConfig",
    [(s.dest, type(s.default)) for s in settings.SETTINGS.values() if s.group == "hydra"]
    + [("seed", int), ("include_train_queries", bool, field(default=True))],  # a training user's own query + gold
    bases=(_HydraConfigRules,), frozen=True)
HydraConfig.__doc__ = "The `hydra` settings of a run (their meaning: common/settings.py), sizes resolved, plus the seed."


def get_config(preset: str = "cpu", **overrides) -> HydraConfig:
    """A preset's config with field overrides (python names, e.g. pseudo_queries=2; None values are ignored).
    "auto" is "paper" where CUDA is available and "cpu" elsewhere."""
    given = {k: v for k, v in overrides.items() if v is not None}
    seed = given.pop("seed", 0)
    extra = {k: given.pop(k) for k in ("include_train_queries",) if k in given}
    cfg = HydraConfig.from_settings({"preset": preset, "seed": seed,
                                     **{k.replace("_", "-"): v for k, v in given.items()}})
    return replace(cfg, **extra) if extra else cfg
