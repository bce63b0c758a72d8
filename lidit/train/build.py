"""The model as trained: fresh (with the captions' feature statistics), a checkpoint to start from
(`init`, e.g. a converted PixArt), or a checkpoint with LoRA adapters; with `trainable: pathway`
only the LLM pathway trains. Wrapped for DDP or sharded with FSDP2."""
from __future__ import annotations

import warnings

import torch

from ..checkpoint import load_checkpoint
from ..config import LIDiTConfig
from ..lora import add_lora
from ..model import LIDiTModel
from ..pixart import is_pathway_key
from .config import TrainConfig
from .dist import Dist


def make_model(model_cfg: LIDiTConfig, cfg: TrainConfig, sources: list) -> LIDiTModel:
    """The bare model on the host, before any wrapping: fresh, from `init`, or a LoRA base with adapters.

    Every rank measures the same feature statistics from the same captions (`sources`: the text
    sources of `inputs.text_sources`, each with `channel_stats()`).
    """
    torch.manual_seed(cfg.seed)
    lora = cfg.lora_config()
    if lora or cfg.init:  # a trained checkpoint keeps the feature statistics its weights were trained on
        model = load_checkpoint(lora.base if lora else cfg.init)
        if not feature_stats_measured(model):  # a fresh pathway, e.g. from the PixArt converter
            model.text.set_feature_stats([source.channel_stats() for source in sources])
        if lora:
            add_adapters(model, cfg)
    else:
        model = LIDiTModel(model_cfg).init_weights()
        model.text.set_feature_stats([source.channel_stats() for source in sources])
    if cfg.trainable == "pathway":
        for name, p in model.named_parameters():
            p.requires_grad_(is_pathway_key(name) or (lora is not None and p.requires_grad))
    model.dit.checkpointing = cfg.activation_checkpointing
    if cfg.compile:
        for block in model.dit.blocks:  # in place: the weight names stay the checkpoint's
            block.compile(backend=cfg.compile)
    return model


def add_adapters(model: LIDiTModel, cfg: TrainConfig) -> None:
    """The run's LoRA adapters; with `trainable: pathway` none on the pathway, which trains in full."""
    pathway = cfg.trainable == "pathway"
    add_lora(model, cfg.lora_config(), lambda path: pathway and is_pathway_key(f"{path}.weight"))


def build_model(model_cfg: LIDiTConfig, cfg: TrainConfig, d: Dist, sources: list,
                bf16: bool) -> tuple[LIDiTModel, torch.nn.Module]:
    """(the bare model, the module to call: DDP- or FSDP-wrapped, or the model itself)."""
    # parameters a step may not reach: a single branch's collaborative block (nothing to attend to), and
    # the null context, used only by a batch that drew an empty caption
    unused = len(model_cfg.text.branches) == 1 or model_cfg.text.null_tokens > 0
    if cfg.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(d.device.type, (d.world,))
        model = None
        # One local process at a time builds the full model on the host and shards it: host memory
        # holds one full copy at once, not one per process (40 GB each for lidit-10b in float32).
        for turn in range(d.local_world):
            if turn == d.local_rank:
                model = make_model(model_cfg, cfg, sources)
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
    model = make_model(model_cfg, cfg, sources).to(d.device)
    if d.on:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [d.device.index] if d.device.type == "cuda" else None
        return model, DDP(model, device_ids=ids, find_unused_parameters=unused)
    return model, model


def feature_stats_measured(model: LIDiTModel) -> bool:
    """False while every branch's FeatureNorm holds its defaults (mean 0, std 1): never measured."""
    return any(bool(r.feature_norm.mean.any()) or bool((r.feature_norm.std != 1).any()) for r in model.text.refiners)
