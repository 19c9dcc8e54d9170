"""HYDRA's sizes and training settings, with named presets.

`paper` keeps HYDRA's published defaults (HYDRA.md §1–§3: 10 pseudo-queries per user, M=10
retrieved, k=4 in the prompt, B=8 candidates, AdamW lr 2e-5, 2 epochs, batch 64, weight
decay 0.01). `cpu` shrinks what costs LLM calls, the dominant cost on a 2-core machine
without a GPU, so a 20+20-user LaMP-7 run takes well under an hour; it also raises the head
learning rate because fresh heads trained on a few dozen examples barely move at 2e-5, and
(classification/rating only) gives the adapter 12 label-set queries per user, which cost no LLM
call: with 3 pseudo-queries alone its scores were flat and hydra only tied rag-4 on synthetic
LaMP-2M (labels.py).
Every run records the preset it used in results.json.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class HydraConfig:
    pseudo_queries: int = 10  # profile items per user turned into training queries
    retrieve: int = 10  # M: BM25 items the reranker scores
    k: int = 4  # items in the prompt
    candidates: int = 8  # B: temperature-1 samples; the greedy answer is added to them
    include_train_queries: bool = True  # training users' own query + gold are training data too
    adapter_generation_labels: str = "gold"  # generation tasks: "gold" (reference code) or "above-mean"
    style: str | None = None  # prompt format (prompts.STYLES); None: the measured best per task
    # Classification/rating only (LaMP-7 and the other generation tasks ignore both; 0 = HYDRA):
    # profile items per user made into extra adapter queries whose candidates are the task's closed
    # label set (the item's own label positive, every other label negative). They cost no LLM call,
    # so the adapter learns the user's label habits from many queries instead of a few (labels.py).
    adapter_label_queries: int = 0
    # A temperature-1 candidate replaces the greedy answer only when its adapter score beats the
    # greedy answer's by more than this, so a weak adapter cannot fall below greedy (pipeline.py).
    adapter_margin: float = 0.0
    # model
    train_layers: int = 2
    head_layers: int = 2
    max_length: int = 256
    # optimisation
    epochs: int = 2
    lr: float = 2e-5
    head_lr: float | None = None  # None: same as lr (HYDRA)
    batch_size: int = 64
    weight_decay: float = 0.01
    seed: int = 0
    preset: str = "paper"

    def __post_init__(self):
        if not 1 <= self.k <= self.retrieve:
            raise ValueError(f"k={self.k} must be between 1 and retrieve (M)={self.retrieve}")
        if self.pseudo_queries < 1 or self.candidates < 1:
            raise ValueError("pseudo_queries and candidates must be at least 1")
        if self.adapter_label_queries < 0 or not 0.0 <= self.adapter_margin < 1.0:
            raise ValueError("adapter_label_queries must be >= 0 and adapter_margin in [0, 1)")
        if self.adapter_generation_labels not in ("gold", "above-mean"):
            raise ValueError("adapter_generation_labels must be 'gold' or 'above-mean'")

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, HydraConfig] = {
    "paper": HydraConfig(),
    "cpu": HydraConfig(pseudo_queries=3, retrieve=6, k=4, candidates=6, adapter_label_queries=12, max_length=128,
                       epochs=3, lr=5e-5, head_lr=1e-3, batch_size=32, preset="cpu"),
}


def get_config(preset: str = "paper", **overrides) -> HydraConfig:
    """A preset with `overrides` (None values are ignored, so argparse defaults pass through).
    "auto" is "paper" where CUDA is available and "cpu" elsewhere."""
    if preset == "auto":
        import torch

        preset = "paper" if torch.cuda.is_available() else "cpu"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
