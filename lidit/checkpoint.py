"""One safetensors file per model: every trainable weight, and the config as JSON in the metadata.

Nothing is ever unpickled. Loading checks the file against the architecture its own config
describes and names the first offending key, so a truncated or foreign file fails loudly.
`load_into` streams the tensors straight into a built model's storage with plain reads: peak
memory is the model plus its largest tensor, never a second copy of the file (a memory map
would keep every page of the file resident beside the model).
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import LIDiTConfig
from .model import LIDiTModel

FORMAT = "lidit-v1"
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


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


def read_header(path: str | os.PathLike) -> tuple[int, dict[str, dict]]:
    """(offset of the data, {key: {dtype, shape, data_offsets}}) of a safetensors file."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def validate_state_dict(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], source: str = "checkpoint") -> None:
    """Raise on the first missing, unexpected or wrongly shaped key, naming both shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in expected.items():
        if key not in shapes:
            raise CheckpointError(f"{source} lacks the weight {key!r} (expected shape {shape})")
        if tuple(shapes[key]) != shape:
            raise CheckpointError(f"{source}: weight {key!r} has shape {tuple(shapes[key])}, the model expects {shape}")
    for key in shapes:
        if key not in expected:
            raise CheckpointError(f"{source} has an unexpected weight {key!r} {tuple(shapes[key])}")


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


@torch.no_grad()
def load_into(path: str | os.PathLike, model: nn.Module, source: str | None = None) -> None:
    """Fill the model's parameters and buffers (any dtype and device: values are cast) from the file."""
    start, header = read_header(path)
    validate_state_dict(model, {k: v["shape"] for k, v in header.items()}, source or os.fspath(path))
    with open(path, "rb", buffering=0) as f:
        for key, target in model.state_dict(keep_vars=True).items():
            info = header[key]
            f.seek(start + info["data_offsets"][0])
            stored = SAFETENSORS_DTYPES[info["dtype"]]
            if stored == target.dtype and target.is_contiguous() and target.device.type == "cpu":
                f.readinto(_bytes(target))
            else:
                buffer = torch.empty(info["shape"], dtype=stored)
                f.readinto(_bytes(buffer))
                target.copy_(buffer)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> LIDiTModel:
    """Build the model its config describes, without random init, and fill it from the file.

    `dtype` applies to the parameters; buffers (FeatureNorm's statistics) stay float32, which
    their range needs.
    """
    config = read_config(path)
    model = LIDiTModel(config, dtype=dtype, device="meta").to_empty(device="cpu")
    load_into(path, model)
    return model.to(device).eval()
