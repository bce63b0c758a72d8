"""One safetensors file per model: every trainable weight, and the config as JSON in the metadata.

Nothing is ever unpickled. Loading checks the file against the architecture its own config
describes and names the first offending key, so a truncated or foreign file fails loudly.
`load_into` streams the tensors straight into a built model's storage with plain reads: peak
memory is the model plus its largest tensor, never a second copy of the file (a memory map
would keep every page of the file resident beside the model).

A model saved by ComfyUI's stock ModelSave (a LoRA baked in, or a merge) is read too: its weights
are under `model.diffusion_model.`, and ComfyUI writes no metadata of its own, so the LI-DiT host
stores the config as the UTF-8 bytes of its JSON in a uint8 tensor named `lidit_config`.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch
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


MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
#: a file saved by ComfyUI's ModelSave: the weights under this prefix, the config JSON in a uint8 tensor
STOCK_PREFIX = "model.diffusion_model."
STOCK_CONFIG_KEY = "lidit_config"
#: the other top-level keys ComfyUI's save writes for a model of LI-DiT's kinds (v-prediction marks)
STOCK_EXTRAS = {"v_pred", "ztsnr"}
MAX_CONFIG_BYTES = 2**20


def read_header(path: str | os.PathLike) -> tuple[int, dict[str, dict], dict[str, str]]:
    """(offset of the data, {key: {dtype, shape, data_offsets}}, metadata) of a safetensors file,
    checked before anything is read past the header: every failure names the file, what is wrong
    with it and what to do."""
    name, size = os.path.basename(path), os.path.getsize(path)
    again = "Download or export it again."
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little")
        if len(head) < 8 or length > min(MAX_HEADER, size - 8):
            raise CheckpointError(
                f"{name} is not a safetensors file: its first bytes announce a {length}-byte header in a {size}-byte "
                f"file. It may be another format renamed to .safetensors, or a download cut short. {again}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{name}: its safetensors header is not valid JSON ({e}). {again}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: its safetensors header is not a JSON object. {again}")
    metadata = header.pop("__metadata__", None) or {}
    end = 0
    for key, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            begin, stop = info["data_offsets"]
            numel = math.prod(info["shape"])
            ok = all(isinstance(n, int) and n >= 0 for n in (*info["shape"], begin, stop))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok or stop - begin != numel * dtype.itemsize:
            raise CheckpointError(f"{name}: the header entry of {key!r} is malformed or of an unsupported dtype "
                                  f"({str(info)[:120]}). {again}")
        end = max(end, stop)
    if 8 + length + end > size:
        raise CheckpointError(f"{name} is truncated: its header describes {8 + length + end} bytes, the file has "
                              f"{size}. The download or copy was cut short. {again}")
    return 8 + length, header, metadata


def config_of(metadata: Mapping[str, str], name: str) -> LIDiTConfig:
    """The config in a checkpoint's metadata, checked (field ranges included) before any model is built."""
    if "lidit_config" not in metadata:
        raise CheckpointError(f"{name} is not an LI-DiT checkpoint: its metadata has no 'lidit_config'. "
                              "Load it with the loader of the model it belongs to.")
    try:
        return LIDiTConfig.from_json(metadata["lidit_config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: the 'lidit_config' in its metadata is invalid: {type(e).__name__}: {e}. "
                              "The file was damaged or written by other software; export it again with lidit's "
                              "trainer.") from None


def stock_saved(path: str | os.PathLike, start: int, header: dict[str, dict],
                metadata: dict[str, str]) -> tuple[dict[str, dict], dict[str, str]]:
    """(header, metadata) as lidit's own format has them: for a file ComfyUI's ModelSave wrote,
    the weights' entries without their `model.diffusion_model.` prefix and the config moved from
    its tensor into the metadata; any other file as it is."""
    if "lidit_config" in metadata or not any(k.startswith(STOCK_PREFIX) for k in header):
        return header, metadata
    name = os.path.basename(path)
    info = header.get(STOCK_CONFIG_KEY)
    if info is None:
        raise CheckpointError(
            f"{name} was saved by ComfyUI (ModelSave or CheckpointSave: its weights are under "
            f"{STOCK_PREFIX!r}) from a MODEL that is not LI-DiT, so it has no 'lidit_config'. Load it with the loader "
            "of the model it belongs to; to save an LI-DiT model, feed ModelSave a MODEL that comes from the LI-DiT "
            "Loader (LoRAs and merges on the way are fine).")
    begin, stop = info["data_offsets"]
    if info["dtype"] != "U8" or len(info["shape"]) != 1 or stop - begin > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{name}: its {STOCK_CONFIG_KEY!r} tensor is not the UTF-8 bytes of a config "
                              f"({str(info)[:120]}). Save the model again with ModelSave.")
    with open(path, "rb") as f:
        f.seek(start + begin)
        text = f.read(stop - begin).decode("utf-8", errors="replace")
    others = sorted(k for k in header if not k.startswith(STOCK_PREFIX) and k not in STOCK_EXTRAS | {STOCK_CONFIG_KEY})
    if others:
        raise CheckpointError(f"{name} holds more than an LI-DiT model (e.g. {others[0]!r}): save the MODEL alone, "
                              "with ModelSave rather than CheckpointSave.")
    return ({k[len(STOCK_PREFIX):]: v for k, v in header.items() if k.startswith(STOCK_PREFIX)},
            {**metadata, "lidit_config": text})


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    start, header, metadata = read_header(path)
    metadata = stock_saved(path, start, header, metadata)[1]
    config_of(metadata, os.path.basename(path))
    return metadata


def read_config(path: str | os.PathLike) -> LIDiTConfig:
    return config_of(read_metadata(path), os.path.basename(path))


@dataclass
class CheckpointFile:
    """A checkpoint whose header and config were read once and checked against each other on the
    meta device: nothing is allocated for a file that cannot fill the model it describes."""

    path: str
    config: LIDiTConfig
    start: int
    header: dict[str, dict]

    @classmethod
    def open(cls, path: str | os.PathLike) -> CheckpointFile:
        name = os.path.basename(path)
        start, header, metadata = read_header(path)
        header, metadata = stock_saved(path, start, header, metadata)
        config = config_of(metadata, name)
        with torch.device("meta"):
            expected = LIDiTModel(config)
        validate_state_dict(expected, {k: v["shape"] for k, v in header.items()}, name)
        return cls(os.fspath(path), config, start, header)

    def stored_dtype(self) -> tuple[torch.dtype, int]:
        """The dtype most of the weights are stored in, and the number of values."""
        counts = Counter()
        for info in self.header.values():
            counts[SAFETENSORS_DTYPES[info["dtype"]]] += math.prod(info["shape"])
        return counts.most_common(1)[0][0], sum(counts.values())


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
def load_into(file: CheckpointFile, model: nn.Module) -> None:
    """Fill the model's parameters and buffers (any dtype and device: values are cast) from the file."""
    with open(file.path, "rb", buffering=0) as f:
        for key, target in model.state_dict(keep_vars=True).items():
            info = file.header[key]
            f.seek(file.start + info["data_offsets"][0])
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
    file = CheckpointFile.open(path)
    model = LIDiTModel(file.config, dtype=dtype, device="meta").to_empty(device="cpu")
    load_into(file, model)
    return model.to(device).eval()
