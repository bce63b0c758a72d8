"""One safetensors file per model: every trainable weight, and the config as JSON in the metadata.

Nothing is ever unpickled. Loading checks the file against the architecture its own config
describes and names the first offending key, so a truncated or foreign file fails loudly.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LIDiTConfig
from .model import LIDiTModel

FORMAT = "lidit-v1"


class CheckpointError(ValueError):
    pass


def save_checkpoint(path: str | os.PathLike, model: LIDiTModel, extra: Mapping[str, str] | None = None) -> None:
    """`extra` lands in the metadata too (e.g. the training command), as strings."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "lidit_config": model.config.to_json(), **(extra or {})}
    save_file(tensors, os.fspath(path), metadata=metadata)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "lidit_config" not in metadata:
        raise CheckpointError(f"{path} is not an LI-DiT checkpoint: its metadata has no 'lidit_config'")
    return metadata


def read_config(path: str | os.PathLike) -> LIDiTConfig:
    return LIDiTConfig.from_json(read_metadata(path)["lidit_config"])


def validate_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise on the first missing, unexpected or wrongly shaped key, naming both shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in expected.items():
        if key not in state:
            raise CheckpointError(f"{source} lacks the weight {key!r} (expected shape {shape})")
        if tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"{source}: weight {key!r} has shape {tuple(state[key].shape)}, the model expects {shape}")
    for key in state:
        if key not in expected:
            raise CheckpointError(f"{source} has an unexpected weight {key!r} {tuple(state[key].shape)}")


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> LIDiTModel:
    """Build the model its config describes, without random init, and fill it from the file."""
    config = read_config(path)
    with torch.device("meta"):
        model = LIDiTModel(config)
    state = load_file(os.fspath(path), device=str(device))
    validate_state_dict(model, state, os.fspath(path))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    return model.eval()
