"""Train an LI-DiT: `python -m lidit.train --config <json> [key=value ...] [--resume] [--fsdp]`.

The same command runs on one process or under `torchrun --nproc_per_node N -m lidit.train ...`
with DistributedDataParallel (gloo on CPU, nccl on GPU), or with FSDP2 (`--fsdp`: every DiT
block, token refiner block and collaborative block is its own shard unit).

One run, in order:
1. The config (a JSON file plus dotted `key=value` overrides) gives the model, the LLM folder per
   branch, the data, the optimiser and the output directory.
2. Every caption the data can produce, plus the empty prompt, is encoded once per LLM branch into
   the on-disk feature cache (`lidit.features`); the ranks split the missing captions. The LLMs
   are then released: the training loop never runs them.
3. The loop: AdamW, warmup + constant/cosine/linear schedule, gradient accumulation, gradient
   clipping, EMA, caption dropout (the empty prompt, encoded with the same template, which is the
   unconditional input at sampling), bf16 autocast where the device has native bf16 (GPUs, and
   CPUs with AVX512-BF16 or AMX).
4. Every `checkpoint_every` steps and at the end: `model.safetensors` (the EMA weights in the
   lidit checkpoint format, with the command, the training config and stats in its metadata) and
   `resume/` (raw weights, EMA, optimiser state, step, RNG and data position: safetensors + JSON,
   nothing pickled). `--resume` continues the same step count, optimiser state and data order.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .checkpoint import load_checkpoint, read_config, save_checkpoint
from .config import LIDiTConfig, preset
from .data import BucketStream, FolderData, SceneStream, load_vae
from .diffusion import FLOW_LOSSES, training_loss
from .features import FeatureCache, FeatureTable, folder_identity
from .instruction import PromptTemplate
from .llm import load_llm
from .lora import LoRAConfig, add_lora, save_lora
from .model import LIDiTModel
from .precision import compute_dtype, native_bf16

_STARTED: float | None = time.time()  # the wall-clock budget counts from process start, feature caching included
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESUME_FORMAT = "lidit-resume-v1"


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    source: str = "scenes"              # "scenes" or "folder:<path>"
    pool_size: int = 2000               # scenes: distinct training captions (each is encoded once)
    pool_seed: int | None = None        # scenes: default = the run's seed
    n_objects: Any = None               # scenes: None (1..4), an int, or a list of counts
    resolution: int | None = None       # pixels; default = the model config's resolution
    buckets: Any = "auto"               # folder: "auto", "none" (one square bucket), or [[w, h], ...]
    vae: str | None = None              # folder + latent model: a local diffusers AutoencoderKL folder


@dataclass
class TrainConfig:
    model: Any = "demo"                 # preset name | {"preset": name, "overrides": {...}} | LIDiTConfig dict
    llms: Any = field(default_factory=dict)  # {branch name: HF folder} or [folder per branch]
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = "out/run"
    cache_dir: str = ".cache/lidit"     # feature (and latent) cache, shared by runs
    seed: int = 0
    steps: int = 1000
    batch_size: int = 32                # images per optimiser step, over all processes and accumulation
    grad_accum: int = 1
    lr: float = 1e-3
    lr_schedule: str = "constant"       # constant | cosine | linear (after warmup)
    lr_final: float = 0.1               # cosine/linear: final lr as a fraction of lr
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0              # 0 = off
    ema_decay: float = 0.999
    ema_warmup: bool = True             # decay min(ema_decay, (1 + step) / (10 + step))
    caption_dropout: float = 0.1
    flow_loss: str = "v"                # flow models: "v" (velocity MSE) or "x0" (clean-image MSE)
    lora: Any = None                    # {"base": checkpoint, "rank", "alpha", "targets"}: train adapters on a frozen checkpoint
    activation_checkpointing: bool = False  # recompute each DiT block in the backward: memory for compute
    checkpoint_every: int = 500
    log_every: int = 10
    max_minutes: float | None = None    # wall-clock budget from process start; saves and stops
    device: str = "auto"                # auto | cpu | cuda
    mixed_precision: str = "auto"       # auto (bf16 autocast where the device has native bf16: GPUs, AVX512-BF16/AMX CPUs) | bf16 | no
    threads: int | None = None          # torch.set_num_threads
    llm_threads: int | None = None      # threads while encoding features (default: threads)
    llm_batch_size: int = 64
    llm_dtype: str = "auto"             # auto (bf16 where the device has native bf16, else float32) | float32 | bfloat16
    feature_dtype: str = "float16"
    save_dtype: str = "float32"         # dtype of model.safetensors
    fsdp: bool = False
    progress: str = "auto"              # auto (tqdm on a terminal) | tqdm | plain | none
    rank_hashes: bool = False           # debug: every rank writes rank<N>.json with a hash of its weights

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"_comment"})
        if unknown:
            raise ValueError(f"unknown training config field(s) {unknown}; known: {sorted(names)}")
        d.pop("_comment", None)
        data = d.get("data", {})
        if isinstance(data, str):
            data = {"source": data}
        dnames = {f.name for f in dataclasses.fields(DataConfig)}
        unknown = sorted(set(data) - dnames)
        if unknown:
            raise ValueError(f"unknown data config field(s) {unknown}; known: {sorted(dnames)}")
        d["data"] = DataConfig(**data)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lora_config(self) -> LoRAConfig | None:
        if self.lora is None:
            return None
        fields = {**self.lora, "targets": tuple(self.lora.get("targets", LoRAConfig.targets))}
        return LoRAConfig(**fields)

    def validate(self) -> None:
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"lr_schedule must be constant, cosine or linear, got {self.lr_schedule!r}")
        if self.flow_loss not in FLOW_LOSSES:
            raise ValueError(f"flow_loss must be one of {FLOW_LOSSES}, got {self.flow_loss!r}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError("caption_dropout must be in [0, 1]")
        if self.grad_accum < 1 or self.batch_size < 1 or self.steps < 0:
            raise ValueError("batch_size and grad_accum must be >= 1 and steps >= 0")
        for name in ("feature_dtype", "save_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {sorted(DTYPES)}")
        if self.lora is not None:
            self.lora_config()
            if self.fsdp:
                raise ValueError("LoRA trains on one process or under DDP; --fsdp is for full training")
        if not (self.data.source == "scenes" or self.data.source.startswith("folder:")):
            raise ValueError(f"data.source must be 'scenes' or 'folder:<path>', got {self.data.source!r}")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def set_dotted(d: dict, key: str, value: Any) -> None:
    """d['a']['b'] = value for key 'a.b', creating dicts on the way (a string leaf becomes a dict
    only where the schema allows it: `model: "demo"` becomes {"preset": "demo"})."""
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = d.get(part)
        if isinstance(nxt, str) and part == "model":
            nxt = {"preset": nxt}
        elif isinstance(nxt, str) and part == "data":
            nxt = {"source": nxt}
        elif not isinstance(nxt, dict):
            nxt = {}
        d[part] = nxt
        d = nxt
    d[parts[-1]] = value


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def model_config(spec: Any, resolution: int | None = None) -> LIDiTConfig:
    """A preset name, {"preset": name, "overrides": {dotted or nested}}, or a full LIDiTConfig dict."""
    if isinstance(spec, str):
        spec = {"preset": spec}
    if "text" in spec and "dit" in spec:
        base = dict(spec)
    else:
        base = preset(spec.get("preset", "demo")).to_dict()
        unknown = set(spec) - {"preset", "overrides"}
        if unknown:
            raise ValueError(f"model: unknown key(s) {sorted(unknown)} (use 'preset' and 'overrides')")
        for key, value in _flatten(spec.get("overrides", {})).items():
            node = base
            *path, last = key.split(".")
            for p in path:
                if not isinstance(node.get(p), dict):
                    raise ValueError(f"model override {key!r}: {p!r} is not a config section")
                node = node[p]
            if last not in node:
                raise ValueError(f"model override {key!r}: no field {last!r} (has {sorted(node)})")
            node[last] = value
    if resolution:
        base["resolution"] = resolution
    return LIDiTConfig.from_dict(base)


def load_config(path: str | None, overrides: Sequence[str] = ()) -> dict:
    d: dict = {}
    if path:
        d = json.loads(Path(path).read_text())
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        set_dotted(d, key.strip(), _parse_value(value))
    return d


def llm_folders(cfg: TrainConfig, model_cfg: LIDiTConfig) -> list[Path]:
    branches = model_cfg.text.branches
    if isinstance(cfg.llms, dict):
        missing = [b.name for b in branches if b.name not in cfg.llms]
        if missing:
            raise ValueError(f"llms has no folder for branch(es) {missing}; it names {sorted(cfg.llms)}")
        folders = [Path(cfg.llms[b.name]) for b in branches]
    else:
        if len(cfg.llms) != len(branches):
            raise ValueError(f"llms lists {len(cfg.llms)} folders for {len(branches)} branches")
        folders = [Path(p) for p in cfg.llms]
    from transformers import AutoConfig

    for folder, branch in zip(folders, branches):
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"LLM folder for branch {branch.name} not found: {folder} (no config.json)")
        hidden = AutoConfig.from_pretrained(folder, local_files_only=True).get_text_config().hidden_size
        if hidden != branch.hidden_size:
            raise ValueError(f"{folder}: hidden size {hidden}, but branch {branch.name} expects {branch.hidden_size} "
                             f"(override model.overrides.text.branches)")
    return folders


# ------------------------------------------------------------------------------------------------
# processes
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# the pieces of a run
# ------------------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) local shard `t` of parameter `like`."""
    if hasattr(like, "to_local"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(t, like.device_mesh, like.placements, shape=like.shape,
                                  stride=like.stride(), run_check=False).full_tensor()
    return t


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimiser step `step` (0-based): a function of the step only."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.lr_schedule == "cosine" else 1 - frac
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * shape)


def ema_decay_at(cfg: TrainConfig, step: int) -> float:
    return min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay


def build_model(model_cfg: LIDiTConfig, cfg: TrainConfig, d: Dist, tables: list[FeatureTable],
                bf16: bool) -> tuple[LIDiTModel, torch.nn.Module]:
    """(the bare model, the module to call: DDP- or FSDP-wrapped, or the model itself).

    Every rank measures the same feature statistics from the same caption pool.
    """
    def make() -> LIDiTModel:
        torch.manual_seed(cfg.seed)
        lora = cfg.lora_config()
        if lora:  # the base keeps its own feature statistics: its weights were trained on them
            model = load_checkpoint(lora.base)
            add_lora(model, lora)
        else:
            model = LIDiTModel(model_cfg).init_weights()
            model.text.set_feature_stats([table.channel_stats() for table in tables])
        model.dit.checkpointing = cfg.activation_checkpointing
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


def make_stream(cfg: TrainConfig, model_cfg: LIDiTConfig, d: Dist, micro: int, resolution: int):
    src = cfg.data.source
    latent = model_cfg.latent_format != "pixel"
    if src == "scenes":
        if latent or model_cfg.dit.in_channels != 3:
            raise ValueError("the synthetic scenes are RGB pixels: they need a pixel model (latent_format 'pixel', "
                             "in_channels 3)")
        return SceneStream.from_config(cfg.data.pool_size, resolution, cfg.seed, d.rank, cfg.data.pool_seed,
                                       cfg.data.n_objects)
    root = src.split(":", 1)[1]
    factor = 8 if latent else 1
    step = model_cfg.dit.patch * factor
    buckets = None
    if isinstance(cfg.data.buckets, list):
        buckets = cfg.data.buckets
    elif cfg.data.buckets == "none":
        buckets = [(resolution, resolution)]
    data = FolderData(root, resolution, step, buckets=buckets)
    say(d, "buckets (w x h: images): " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in data.bucket_sizes().items() if n))
    if latent:
        if not cfg.data.vae:
            raise ValueError(f"this model works in {model_cfg.latent_format} latents (in_channels "
                             f"{model_cfg.dit.in_channels}): set data.vae to a local diffusers AutoencoderKL folder")
        vae_dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
        vae = load_vae(cfg.data.vae, d.device, vae_dtype)
        attach_vae(data, vae, cfg, model_cfg, d, folder_identity(cfg.data.vae), vae_dtype)
        del vae
    elif model_cfg.dit.in_channels != 3:
        raise ValueError(f"a pixel model needs in_channels 3, got {model_cfg.dit.in_channels}")
    return BucketStream(data, micro, cfg.seed, d.rank, d.world)


# ComfyUI's latent formats; the VAE's own constants must agree, or the host decodes wrongly.
LATENT_CONSTANTS = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}


def attach_vae(data: FolderData, vae, cfg: TrainConfig, model_cfg: LIDiTConfig, d: Dist, vae_id: str,
               dtype: torch.dtype = torch.float32) -> None:
    channels = getattr(getattr(vae, "config", None), "latent_channels", model_cfg.dit.in_channels)
    if channels != model_cfg.dit.in_channels:
        raise ValueError(f"the VAE makes {channels}-channel latents, the model takes {model_cfg.dit.in_channels}")
    t0 = time.perf_counter()
    data.cache_latents(vae, Path(cfg.cache_dir) / "latents", vae_id, d.device, dtype, d.rank, d.world, d.barrier)
    scale, shift = data.latent_scale
    want = LATENT_CONSTANTS.get(model_cfg.latent_format)
    if want and (abs(scale - want[0]) > 1e-3 or abs(shift - want[1]) > 1e-3):
        warnings.warn(f"the VAE scales latents by {scale} and shifts by {shift}, but latent_format "
                      f"{model_cfg.latent_format!r} decodes with {want}: the checkpoint will decode wrongly in ComfyUI")
    say(d, f"latents: {len(data.items)} images cached in {time.perf_counter() - t0:.1f} s")


def cache_features(cfg: TrainConfig, model_cfg: LIDiTConfig, folders: list[Path], captions: list[str],
                   d: Dist) -> tuple[list[FeatureTable], list[dict]]:
    """Encode what is missing (ranks split the work), then load every caption's features."""
    template = PromptTemplate.of(model_cfg.text)
    llm_dtype = compute_dtype(d.device) if cfg.llm_dtype == "auto" else DTYPES[cfg.llm_dtype]
    tables, stats = [], []
    threads = torch.get_num_threads()
    if cfg.llm_threads:
        torch.set_num_threads(cfg.llm_threads)
    wanted = list(dict.fromkeys([""] + captions))  # "" = the dropped caption and the unconditional input
    for folder, branch in zip(folders, model_cfg.text.branches):
        cache = FeatureCache(Path(cfg.cache_dir) / "features", folder, branch.layer, template,
                             model_cfg.text.max_tokens, cfg.feature_dtype)
        todo = cache.missing(wanted)
        d.barrier()  # everyone has scanned before anyone writes, so the split below is the same everywhere
        if todo:
            say(d, f"features: {branch.name}: {len(todo)} of {len(wanted)} captions to encode")
        started, last = time.perf_counter(), [0.0]

        def progress(done: int, total: int) -> None:
            now = time.perf_counter()
            if d.main and (now - last[0] > 5 or done == total):
                last[0] = now
                rate = done / max(now - started, 1e-9)
                say(d, f"features: {branch.name}: {done}/{total} on rank 0 ({rate:.1f} captions/s)")

        cache.build(todo[d.rank::d.world],
                    lambda folder=folder, branch=branch: _quiet_load(folder, branch.layer, llm_dtype, d.device),
                    batch_size=cfg.llm_batch_size, write_prefix=d.main, progress=progress)
        d.barrier()
        tables.append(cache.load(wanted))
        stats.append({"branch": branch.name, "folder": str(folder), "identity": cache.identity, "dir": str(cache.dir),
                      **cache.stats})
        if d.device.type == "cuda":
            torch.cuda.empty_cache()
    torch.set_num_threads(threads)
    return tables, stats


def _quiet_load(folder: Path, layer: int, dtype: torch.dtype, device: torch.device):
    """load_llm without transformers' per-load progress bars in the training log."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load_llm(folder, layer=layer, dtype=dtype, device=device)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


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
        self.shadow = {n: _local(p).detach().float().clone() for n, p in named}

    @torch.no_grad()
    def update(self, decay: float) -> None:
        names = [n for n, _ in self.named]
        torch._foreach_lerp_([self.shadow[n] for n in names], [_local(p).detach().float() for _, p in self.named],
                             1.0 - decay)

    def full_state(self, model: LIDiTModel) -> dict[str, torch.Tensor]:
        """Whole EMA weights (gathered from all shards; a collective under FSDP) plus buffers, on CPU."""
        params = dict(self.named)
        out = {}
        for name, value in model.state_dict().items():
            if name in params:
                out[name] = _full(self.shadow[name], params[name]).detach().cpu()
            else:
                out[name] = _full(_local(value), value).detach().cpu()
        return out


def weights_hash(named: list[tuple[str, torch.nn.Parameter]], values: dict[str, torch.Tensor] | None = None) -> str:
    """sha256 of the whole weights (gathered under FSDP), or of `values` (local shards) laid out like them."""
    h = hashlib.sha256()
    for name, p in named:
        local = _local(p).detach() if values is None else values[name]
        h.update(name.encode())
        h.update(_full(local, p).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# saving and resuming
# ------------------------------------------------------------------------------------------------
def command_line(argv: Sequence[str]) -> str:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        head = f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', os.environ['WORLD_SIZE'])} -m lidit.train"
    else:
        head = "python -m lidit.train"
    return " ".join([head, *map(shlex.quote, argv)])


def save_model(path: Path, model: LIDiTModel, ema: EMA, cfg: TrainConfig, extra: dict[str, str], d: Dist) -> None:
    """model.safetensors (EMA weights), or for LoRA training lora.safetensors (EMA adapters, ComfyUI keys)."""
    state = ema.full_state(model)  # every rank takes part in the gathers
    if not d.main:
        return
    if cfg.lora is not None:
        tmp = path.with_name(".lora.safetensors.tmp")
        save_lora(tmp, model, state, {**extra, "lidit_base": cfg.lora_config().base})
        os.replace(tmp, path.with_name("lora.safetensors"))
        return
    dtype = DTYPES[cfg.save_dtype]
    with torch.device("meta"):
        out = LIDiTModel(model.config)
    out.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_checkpoint(tmp, out, extra)
    os.replace(tmp, path)


def _opt_tensors(opt: torch.optim.Optimizer, named) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for name, p in named:
        for key, value in opt.state.get(p, {}).items():
            if torch.is_tensor(value):
                tensors[f"optim.{name}.{key}"] = _local(value).detach().cpu().contiguous()
            else:
                scalars[f"{name}.{key}"] = value
    return tensors, scalars


def save_resume(root: Path, step: int, model: LIDiTModel, named, ema: EMA, opt, stream, dropout_rng, noise_gen,
                cfg: TrainConfig, model_cfg: LIDiTConfig, info: dict, d: Dist) -> None:
    """`root/resume/`: written to a temporary folder by all ranks, then swapped in by rank 0."""
    tmp, final = root / "resume.tmp", root / "resume"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    sharded = cfg.fsdp
    if d.main or sharded:
        tensors = {f"model.{n}": _local(p).detach().cpu().contiguous() for n, p in named}
        tensors.update({f"ema.{n}": t.cpu().contiguous() for n, t in ema.shadow.items()})
        opt_tensors, opt_scalars = _opt_tensors(opt, named)
        tensors.update(opt_tensors)
        save_file(tensors, os.fspath(tmp / (f"state-rank{d.rank}.safetensors" if sharded else "state.safetensors")),
                  metadata={"format": RESUME_FORMAT})
        if d.main:
            (tmp / "state.json").write_text(json.dumps({
                "format": RESUME_FORMAT, "step": step, "world_size": d.world, "fsdp": sharded,
                "train_config": cfg.to_dict(), "model_config": model_cfg.to_dict(),
                "optimizer_scalars": opt_scalars,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
                **info}, indent=1, default=list))
    rng = {"data": stream.state_dict(), "dropout": dropout_rng.bit_generator.state,
           "noise": noise_gen.get_state().cpu().numpy().tobytes().hex()}
    (tmp / f"rng-rank{d.rank}.json").write_text(json.dumps(rng))
    d.barrier()
    if d.main:
        old = root / "resume.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    d.barrier()


def load_resume(path: Path, model_cfg: LIDiTConfig, named, ema: EMA, opt, stream, dropout_rng, noise_gen,
                cfg: TrainConfig, d: Dist) -> dict:
    meta = json.loads((path / "state.json").read_text())
    if meta.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path} is not a lidit resume state")
    if meta["model_config"] != json.loads(model_cfg.to_json()):
        raise ValueError(f"{path} was saved for another model config")
    if meta["world_size"] != d.world:
        raise ValueError(f"{path} was saved by {meta['world_size']} processes; resume with the same number "
                         f"(the data order of each process is part of the state)")
    if meta["fsdp"] != cfg.fsdp:
        raise ValueError(f"{path} was saved {'with' if meta['fsdp'] else 'without'} --fsdp; resume the same way")
    file = path / (f"state-rank{d.rank}.safetensors" if meta["fsdp"] else "state.safetensors")
    tensors = load_file(os.fspath(file))
    with torch.no_grad():
        for name, p in named:
            _local(p).copy_(tensors[f"model.{name}"])
            ema.shadow[name].copy_(tensors[f"ema.{name}"])
            state = {}
            for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                t = tensors.get(f"optim.{name}.{key}")
                if t is None:
                    continue
                if key == "step":
                    state[key] = t.clone()
                elif hasattr(p, "to_local"):
                    from torch.distributed.tensor import DTensor

                    state[key] = DTensor.from_local(t.to(p.device, p.dtype), p.device_mesh, p.placements,
                                                    shape=p.shape, stride=p.stride(), run_check=False)
                else:
                    state[key] = t.to(p.device, p.dtype)
            for key, value in meta["optimizer_scalars"].items():
                pname, _, skey = key.rpartition(".")
                if pname == name:
                    state[skey] = value
            if state:
                opt.state[p] = state
    rng = json.loads((path / f"rng-rank{d.rank}.json").read_text())
    stream.load_state_dict(rng["data"])
    dropout_rng.bit_generator.state = rng["dropout"]
    noise_gen.set_state(torch.frombuffer(bytearray.fromhex(rng["noise"]), dtype=torch.uint8))
    return meta


# ------------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------------
class Progress:
    def __init__(self, mode: str, total: int, initial: int, every: int, enabled: bool,
                 deadline: float | None = None) -> None:
        self.bar, self.every, self.enabled, self.total, self.deadline = None, max(1, every), enabled, total, deadline
        if mode == "auto":
            mode = "tqdm" if sys.stderr.isatty() else "plain"
        self.mode = mode if enabled else "none"
        if self.mode == "tqdm":
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train", mininterval=1.0)
            except ImportError:
                self.mode = "plain"
        self.t0, self.s0 = time.perf_counter(), initial

    def update(self, step: int, loss: float | None, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        elif self.mode == "plain" and loss is not None:
            rate = (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
            eta = (self.total - step) / max(rate, 1e-9)
            if self.deadline is not None:  # the wall-clock budget ends the run first
                eta = max(0.0, min(eta, self.deadline - time.time()))
            print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {rate:.2f} it/s  "
                  f"eta {int(eta // 60)}:{int(eta % 60):02d}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, resume: str | Path | None = None, stop_after: int | None = None,
          argv: Sequence[str] = (), started: float | None = None) -> dict:
    """Run (or continue) training; returns the final stats. `stop_after`: at most this many steps
    in this invocation (then save, as the wall-clock budget does). `started`: the time.time() the
    wall-clock budget counts from (default: now)."""
    started = time.time() if started is None else started
    d = setup_processes(cfg.device, cfg.fsdp)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    lora = cfg.lora_config()
    model_cfg = read_config(lora.base) if lora else model_config(cfg.model, cfg.data.resolution)
    resolution = model_cfg.resolution
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    d.barrier()
    per_step = d.world * cfg.grad_accum
    if cfg.batch_size % per_step:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by processes x grad_accum = {per_step}")
    micro = cfg.batch_size // per_step
    folders = llm_folders(cfg, model_cfg)

    stream = make_stream(cfg, model_cfg, d, micro, resolution)
    t_features = time.perf_counter()
    tables, feature_stats = cache_features(cfg, model_cfg, folders, stream.captions, d)
    t_features = time.perf_counter() - t_features
    say(d, f"features ready in {t_features:.1f} s ({sum(s['encoded'] for s in feature_stats)} encoded, "
           f"{len(tables[0].entries)} captions per branch)")

    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and native_bf16(d.device))
    model, net = build_model(model_cfg, cfg, d, tables, bf16)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # LoRA: the adapters only
    opt = make_optimizer(cfg, named, d.device)
    ema = EMA(named)
    seeds = np.random.SeedSequence([cfg.seed, d.rank, 0x7EA1]).generate_state(2)
    dropout_rng = np.random.default_rng(int(seeds[0]))
    noise_gen = torch.Generator(d.device).manual_seed(int(seeds[1]))

    step, prior_seconds, images_seen = 0, 0.0, 0
    window: list[float] = []  # per-step losses since the last log line
    if resume:
        meta = load_resume(Path(resume), model_cfg, named, ema, opt, stream, dropout_rng, noise_gen, cfg, d)
        step, prior_seconds, images_seen = meta["step"], meta.get("train_seconds", 0.0), meta.get("images_seen", 0)
        window = list(meta.get("loss_window", []))
        say(d, f"resumed from {resume} at step {step}")

    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    log_path = out / "log.jsonl"
    if d.main:  # a fresh run starts a fresh log; a resumed one drops what came after its state
        kept = [] if not resume or not log_path.exists() else [
            line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        log_path.write_text("".join(line + "\n" for line in kept))
    progress = Progress(cfg.progress, cfg.steps, step, cfg.log_every, d.main, started + budget if budget else None)
    start_step, t_loop = step, time.perf_counter()
    last_loss = float("nan")
    grad_norm = torch.zeros(())
    step_times: list[float] = []
    skipped = 0

    def info() -> dict:
        seconds = prior_seconds + time.perf_counter() - t_loop
        return {"step": step, "images_seen": images_seen, "loss_window": [float(x) for x in window], "train_seconds": round(seconds, 2),
                "wall_seconds_this_run": round(time.time() - started, 2), "last_loss": last_loss,
                "seconds_per_step": round(float(np.median(step_times)), 4) if step_times else None}

    def checkpoint() -> None:
        stats = {**{k: v for k, v in info().items() if k != "loss_window"}, "world_size": d.world, "fsdp": cfg.fsdp, "device": str(d.device),
                 "threads": torch.get_num_threads(), "machine": f"{platform.machine()} {platform.processor()} "
                 f"{os.cpu_count()} cpus".strip(), "gpu": torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else None,
                 "torch": torch.__version__, "features": feature_stats, "feature_seconds": round(t_features, 2)}
        extra = {"training_command": command_line(argv), "training_config": json.dumps(cfg.to_dict()),
                 "training_stats": json.dumps(stats, default=str)}
        save_model(out / "model.safetensors", model, ema, cfg, extra, d)
        save_resume(out, step, model, named, ema, opt, stream, dropout_rng, noise_gen, cfg, model_cfg, info(), d)

    net.train()
    stop = False
    while step < cfg.steps and not stop:
        t0 = time.perf_counter()
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=d.device)  # summed on the device: no sync per step
        for k in range(cfg.grad_accum):
            x0, captions = stream.next_batch(micro)
            if cfg.caption_dropout > 0:
                drop = dropout_rng.random(len(captions)) < cfg.caption_dropout
                captions = ["" if dropped else c for c, dropped in zip(captions, drop)]
            texts = [table.states(captions, d.device) for table in tables]
            x0 = x0.to(d.device)
            sync = k == cfg.grad_accum - 1  # gradients are reduced on the last micro-batch only
            if hasattr(net, "set_requires_gradient_sync"):  # FSDP2
                net.set_requires_gradient_sync(sync)
            ctx = net.no_sync() if not sync and hasattr(net, "no_sync") else contextlib.nullcontext()
            with ctx, torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = training_loss(net, model_cfg, x0, texts, generator=noise_gen, flow_loss=cfg.flow_loss)
                (loss / cfg.grad_accum).backward()
            total += loss.detach().float() / cfg.grad_accum
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.grad_clip)
        # one read per step, agreed by all ranks: a NaN/inf loss or gradient never reaches the weights
        finite = bool(torch.isfinite(total)) and bool(torch.isfinite(grad_norm))
        if d.mean([float(not finite)])[0] > 0:
            skipped += 1
            say(d, f"step {step + 1}: non-finite loss or gradient, step skipped ({skipped} so far)")
            if d.main:
                with log_path.open("a") as f:
                    f.write(json.dumps({"step": step + 1, "skipped": "non-finite loss or gradient",
                                        "skipped_total": skipped}) + "\n")
        else:
            opt.step()
            ema.update(ema_decay_at(cfg, step))
            window.append(total)
        opt.zero_grad(set_to_none=True)
        step += 1
        images_seen += cfg.batch_size
        step_times.append(time.perf_counter() - t0)
        logged = None
        if window and (step % cfg.log_every == 0 or step == cfg.steps):
            gn = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            window = [float(x) for x in window]
            mean_loss, gn = d.mean([sum(window) / len(window), gn])
            last_loss = logged = mean_loss
            if d.main:
                with log_path.open("a") as f:
                    f.write(json.dumps({"step": step, "loss": round(mean_loss, 6), "lr": lr, "grad_norm": round(gn, 4),
                                        "images": images_seen, "seconds": round(prior_seconds + time.perf_counter() - t_loop, 2),
                                        "step_seconds": round(float(np.mean(step_times[-len(window):])), 4)}) + "\n")
            window = []
        progress.update(step, logged, lr)
        out_of_time = budget is not None and d.agree(time.time() - started + step_times[-1] > budget)
        stop = out_of_time or (stop_after is not None and step - start_step >= stop_after)
        if stop and out_of_time:
            say(d, f"\nwall-clock budget of {cfg.max_minutes} min reached at step {step}")
        if step % cfg.checkpoint_every == 0 and step < cfg.steps and not stop:
            checkpoint()
    progress.close()
    checkpoint()
    result = {**info(), "output_dir": str(out), "feature_seconds": t_features, "features": feature_stats}
    if cfg.rank_hashes:
        hashes = {"weights": weights_hash(named), "ema": weights_hash([(n, p) for n, p in named], ema.shadow)}
        (out / f"rank{d.rank}.json").write_text(json.dumps({"rank": d.rank, "step": step, **hashes}))
    say(d, f"done: step {step}, loss {last_loss:.4f}, {result['train_seconds']:.0f} s training, "
           f"{time.time() - started:.0f} s in all -> {out / ('lora' if cfg.lora else 'model')}.safetensors")
    if d.on:
        d.barrier()
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m lidit.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="training config JSON (see docs/training.md)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, values as JSON, e.g. steps=2000 "
                        "data.pool_size=1500 model.overrides.dit.depth=6")
    parser.add_argument("--resume", action="store_true", help="continue from <output_dir>/resume")
    parser.add_argument("--resume-from", metavar="DIR", help="continue from this resume folder")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP")
    parser.add_argument("--stop-after", type=int, help="stop (and save) after this many steps in this invocation")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_intermixed_args(argv)
    raw = load_config(args.config, args.overrides)
    if args.fsdp:
        raw["fsdp"] = True
    cfg = TrainConfig.from_dict(raw)
    if args.print_config:
        print(json.dumps({"train": cfg.to_dict(), "model": model_config(cfg.model, cfg.data.resolution).to_dict()},
                         indent=1))
        return {}
    resume = None
    if args.resume or args.resume_from:
        resume = Path(args.resume_from) if args.resume_from else Path(cfg.output_dir) / "resume"
        if not (resume / "state.json").is_file():
            raise SystemExit(f"nothing to resume: {resume}/state.json does not exist")
    global _STARTED
    started, _STARTED = _STARTED or time.time(), None  # a second main() in one process counts from its own start
    owned = not dist.is_initialized()  # a caller that set up the process group keeps it
    try:
        return train(cfg, resume, args.stop_after, argv, started=started)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
