"""Processes and devices: one process, DDP or FSDP2 ranks; DTensor shards and their full views."""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def mean(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        if self.on:
            dist.all_reduce(t)
            t /= self.world
        return t.tolist()

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision, for every rank."""
        if not self.on:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())


def setup_processes(device: str, fsdp: bool = False) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 matmuls on tensor cores
    else:
        dev = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
    elif fsdp and not dist.is_initialized():  # FSDP on one process still needs a (one-member) group
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(rank, world, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))), dev)


def say(d: Dist, *args) -> None:
    if d.main:
        print(*args, file=sys.stderr, flush=True)


def shard_of(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def sharded_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A local shard `t` of parameter `like` as the DTensor it is a shard of (FSDP2), or `t` itself;
    the DTensor shares `t`'s memory, so a checkpoint can load into it in place."""
    if hasattr(like, "to_local"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(t, like.device_mesh, like.placements, shape=like.shape,
                                  stride=like.stride(), run_check=False)
    return t


def unshard(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) local shard `t` of parameter `like`."""
    full = sharded_like(t, like)
    return full.full_tensor() if full is not t else t
