"""AdamW with decay groups, the EMA of the weights, and weight hashes for checks across ranks."""
from __future__ import annotations

import hashlib

import torch

from ..model import LIDiTModel
from .config import TrainConfig
from .dist import shard_of, unshard


def decays(name: str, p: torch.Tensor) -> bool:
    """Weight decay for matrices only: never for biases and norm scales (1-D), the zero-initialised
    gates and AdaLN modulations, or the embeddings (patch, position, timestep)."""
    return p.dim() >= 2 and not any(part in name for part in (".gates.", ".adaln.", "embed"))


def make_optimizer(cfg: TrainConfig, named: list[tuple[str, torch.nn.Parameter]], device: torch.device):
    """AdamW with two groups (see `decays`); fused kernels on CUDA."""
    groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas,
                             fused=device.type == "cuda" or None)


class EMA:
    """Exponential moving average of the (local shards of the) parameters, in float32."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]]) -> None:
        self.named = named
        self.shadow = {n: shard_of(p).detach().float().clone() for n, p in named}

    @torch.no_grad()
    def update(self, decay: float) -> None:
        names = [n for n, _ in self.named]
        torch._foreach_lerp_([self.shadow[n] for n in names], [shard_of(p).detach().float() for _, p in self.named],
                             1.0 - decay)

    def full_state(self, model: LIDiTModel) -> dict[str, torch.Tensor]:
        """Whole EMA weights (gathered from all shards; a collective under FSDP) plus buffers, on CPU."""
        params = dict(self.named)
        out = {}
        for name, value in model.state_dict().items():
            if name in params:
                out[name] = unshard(self.shadow[name], params[name]).detach().cpu()
            else:
                out[name] = unshard(shard_of(value), value).detach().cpu()
        return out


def weights_hash(named: list[tuple[str, torch.nn.Parameter]], values: dict[str, torch.Tensor] | None = None) -> str:
    """sha256 of the whole weights (gathered under FSDP), or of `values` (local shards) laid out like them."""
    h = hashlib.sha256()
    for name, p in named:
        local = shard_of(p).detach() if values is None else values[name]
        h.update(name.encode())
        h.update(unshard(local, p).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
