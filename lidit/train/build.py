"""The model as trained: fresh (with the captions' feature statistics) or a checkpoint with LoRA adapters,
wrapped for DDP or sharded with FSDP2."""
from __future__ import annotations

import warnings

import torch

from ..checkpoint import load_checkpoint
from ..config import LIDiTConfig
from ..lora import add_lora
from ..model import LIDiTModel
from .config import TrainConfig
from .dist import Dist


def build_model(model_cfg: LIDiTConfig, cfg: TrainConfig, d: Dist, sources: list,
                bf16: bool) -> tuple[LIDiTModel, torch.nn.Module]:
    """(the bare model, the module to call: DDP- or FSDP-wrapped, or the model itself).

    Every rank measures the same feature statistics from the same captions (`sources`: the text
    sources of `inputs.text_sources`, each with `channel_stats()`).
    """
    def make() -> LIDiTModel:
        torch.manual_seed(cfg.seed)
        lora = cfg.lora_config()
        if lora:  # the base keeps its own feature statistics: its weights were trained on them
            model = load_checkpoint(lora.base)
            add_lora(model, lora)
        else:
            model = LIDiTModel(model_cfg).init_weights()
            model.text.set_feature_stats([source.channel_stats() for source in sources])
        model.dit.checkpointing = cfg.activation_checkpointing
        if cfg.compile:
            for block in model.dit.blocks:  # in place: the weight names stay the checkpoint's
                block.compile(backend=cfg.compile)
        return model

    single_branch = len(model_cfg.text.branches) == 1  # its collaborative block has nothing to attend to
    if cfg.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(d.device.type, (d.world,))
        model = None
        # One local process at a time builds the full model on the host and shards it: host memory
        # holds one full copy at once, not one per process (40 GB each for lidit-10b in float32).
        for turn in range(d.local_world):
            if turn == d.local_rank:
                model = make()
                # refiner blocks, not whole refiners: their input projections run in `prepare`,
                # inside the root's forward, so they belong to the root unit
                units = [*(b for r in model.text.refiners for b in r.blocks), *model.text.collab, *model.dit.blocks]
                # bf16: parameters gathered and computed in bf16, gradients reduced in fp32
                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
                    else MixedPrecisionPolicy()
                for unit in units:
                    fully_shard(unit, mesh=mesh, mp_policy=policy)
                fully_shard(model, mesh=mesh, mp_policy=policy)
            d.barrier()
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        return model, model
    model = make().to(d.device)
    if d.on:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [d.device.index] if d.device.type == "cuda" else None
        return model, DDP(model, device_ids=ids, find_unused_parameters=single_branch)
    return model, model
