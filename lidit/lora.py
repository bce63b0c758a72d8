"""Low-rank adapters for an existing LI-DiT: trained on top of frozen weights, shipped as a small
file that ComfyUI's stock LoraLoaderModelOnly applies to the LI-DiT MODEL.

A targeted Linear W becomes W + (alpha / rank) * up @ down. `up` starts at zero, so a fresh adapter
changes nothing. The export uses ComfyUI's generic keys, `diffusion_model.<module path>.lora_up.weight`,
`.lora_down.weight` and `.alpha`, which its LoRA loader maps onto any MODEL's weights by name, with
no "lora key not loaded" warning.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import nn

from .model import LIDiTModel

PREFIX = "diffusion_model."


@dataclass(frozen=True)
class LoRAConfig:
    """`base`: the checkpoint to adapt; `targets`: module path prefixes whose Linears get adapters."""

    base: str
    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = ("dit.blocks", "text.refiners", "text.collab")

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"LoRA rank must be >= 1 and alpha > 0, got rank {self.rank}, alpha {self.alpha}")
        if not self.targets:
            raise ValueError("LoRA targets must name at least one module path prefix, e.g. 'dit.blocks'")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.up = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.rank, self.alpha, self.enabled = rank, alpha, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        return self.base(x) + self.up(self.down(x)) * (self.alpha / self.rank)


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The model as it was before its adapters (e.g. PixArt itself, as the distillation teacher)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True


def add_lora(model: LIDiTModel, config: LoRAConfig, skip: Callable[[str], bool] = lambda path: False) -> list[str]:
    """Freeze the model and wrap every Linear under a target prefix (but those `skip` names); returns
    the wrapped paths."""
    model.requires_grad_(False)
    wrapped = []
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and path.startswith(config.targets) and not skip(path):
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, LoRALinear(module, config.rank, config.alpha))
            wrapped.append(path)
    if not wrapped:
        raise ValueError(f"no Linear layer of the model starts with any of the LoRA targets {config.targets}")
    return wrapped


def save_lora(path: str | os.PathLike, model: LIDiTModel, state: dict[str, torch.Tensor] | None = None,
              metadata: dict[str, str] | None = None) -> None:
    """Write the adapters under ComfyUI's keys, from `state` (e.g. EMA weights) or the model's own."""
    state = model.state_dict() if state is None else state
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            key = f"{PREFIX}{name}"
            tensors[f"{key}.lora_down.weight"] = state[f"{name}.down.weight"].detach().float().cpu().contiguous()
            tensors[f"{key}.lora_up.weight"] = state[f"{name}.up.weight"].detach().float().cpu().contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(module.alpha))
    save_file(tensors, os.fspath(path), metadata={"format": "lidit-lora-v1", **(metadata or {})})
