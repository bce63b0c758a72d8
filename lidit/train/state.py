"""What a run leaves: model.safetensors (or lora.safetensors) and a resume state that reshards.

The resume state goes through torch.distributed.checkpoint (DCP) with its Hugging Face safetensors
storage: every rank writes the shards it owns with their offsets, and the reader rebuilds the
layout from the safetensors headers. Nothing is pickled, and any world size, with DDP, FSDP2 or
one process, loads what any other saved.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import warnings
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter

from ..checkpoint import save_checkpoint
from ..config import LIDiTConfig
from ..lora import save_lora
from ..model import LIDiTModel
from ..pixart import save_pathway
from ..precision import DTYPES
from .build import add_adapters
from .config import TrainConfig
from .dist import Dist, sharded_like
from .optim import EMA

RESUME_FORMAT = "lidit-resume-v2"
# one process without a process group is DCP's `no_dist` mode, which warns at every call
warnings.filterwarnings("ignore", message="torch.distributed is .*assuming the intent is to (load|save) in a single process")
RNG_SALT = 0x7EA1


def command_line(argv: Sequence[str]) -> str:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        head = f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', os.environ['WORLD_SIZE'])} -m lidit train"
    else:
        head = "python -m lidit train"
    return " ".join([head, *map(shlex.quote, argv)])


def save_model(path: Path, model: LIDiTModel, ema: EMA, cfg: TrainConfig, extra: dict[str, str], d: Dist) -> None:
    """model.safetensors (EMA weights), or for LoRA training lora.safetensors (EMA adapters, ComfyUI
    keys), plus with `trainable: pathway` pathway.safetensors (the pathway, trained in full: a pathway
    file for LI-DiT From PixArt, whose MODEL the LoRA then adapts)."""
    state = ema.full_state(model)  # every rank takes part in the gathers
    if not d.main:
        return
    if cfg.lora is not None:
        tmp = path.with_name(".lora.safetensors.tmp")
        save_lora(tmp, model, state, {**extra, "lidit_base": cfg.lora_config().base})
        os.replace(tmp, path.with_name("lora.safetensors"))
        if cfg.trainable == "pathway":
            tmp = path.with_name(".pathway.safetensors.tmp")
            save_pathway(tmp, ema_model(model, state, cfg), extra)
            os.replace(tmp, path.with_name("pathway.safetensors"))
        return
    dtype = DTYPES[cfg.save_dtype]
    tmp = path.with_name(f".{path.name}.tmp")
    save_checkpoint(tmp, ema_model(model, {k: v.to(dtype) for k, v in state.items()}, cfg), extra)
    os.replace(tmp, path)


def ema_model(model: LIDiTModel, state: dict[str, torch.Tensor], cfg: TrainConfig) -> LIDiTModel:
    """A plain (unsharded) model holding `state`, e.g. the gathered EMA weights: built on the meta
    device, so its tensors are `state`'s own, with no second copy."""
    with torch.device("meta"):
        out = LIDiTModel(model.config)
        if cfg.lora is not None:
            add_adapters(out, cfg)
    out.load_state_dict(state, assign=True)
    return out


def rank_rngs(seed: int, rank: int, device: torch.device,
              step: int | None = None) -> tuple[np.random.Generator, torch.Generator]:
    """A rank's caption-dropout RNG and noise generator; with `step`, fresh ones for a rank that
    resumes a state saved at another world size (its own saved streams may not exist)."""
    seeds = np.random.SeedSequence([seed, rank, RNG_SALT, *([] if step is None else [step])]).generate_state(2)
    return np.random.default_rng(int(seeds[0])), torch.Generator(device).manual_seed(int(seeds[1]))


def _resume_tensors(named, ema: EMA, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The logical layout, the same for one process, DDP and FSDP2: `model.<name>`, `ema.<name>`,
    `optim.<name>.<key>`. Under FSDP2 the values are DTensors, so each rank writes its shards."""
    out = {}
    for name, p in named:
        out[f"model.{name}"] = p.detach()
        out[f"ema.{name}"] = sharded_like(ema.shadow[name], p)
        out.update({f"optim.{name}.{key}": value.detach() for key, value in opt.state.get(p, {}).items()})
    return out


def _no_dist() -> bool:
    return not dist.is_initialized()


class ResumeSaver:
    """Writes `root/resume/` atomically: all ranks write `resume.tmp/`, and rank 0 swaps it in once
    every rank has finished. With `async_save`, DCP copies the state to host memory and writes it in
    a background thread (on a gloo group of its own) while training goes on; the next save, and
    `wait()` at the end, finish it first."""

    def __init__(self, root: Path, d: Dist, async_save: bool) -> None:
        self.root, self.d, self.async_save = root, d, async_save
        self.pending: Future | None = None
        self.group = dist.new_group(backend="gloo") if async_save and not _no_dist() else None

    def save(self, step: int, named, ema: EMA, opt: torch.optim.Optimizer, stream, dropout_rng: np.random.Generator,
             noise_gen: torch.Generator, cfg: TrainConfig, model_cfg: LIDiTConfig, info: dict) -> None:
        self.wait()
        d, tmp = self.d, self.root / "resume.tmp"
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            (tmp / "state.json").write_text(json.dumps({
                "format": RESUME_FORMAT, "step": step, "world_size": d.world, "fsdp": cfg.fsdp,
                "train_config": cfg.to_dict(), "model_config": model_cfg.to_dict(),
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
                **info}, indent=1, default=list))
        d.barrier()
        rng = {"data": stream.state_dict(), "dropout": dropout_rng.bit_generator.state,
               "noise": noise_gen.get_state().cpu().numpy().tobytes().hex()}
        (tmp / f"rng-rank{d.rank}.json").write_text(json.dumps(rng))
        writer = HuggingFaceStorageWriter(os.fspath(tmp / "dcp"), save_distributed=True)
        state = _resume_tensors(named, ema, opt)
        if self.async_save:
            self.pending = dcp.async_save(state, storage_writer=writer, process_group=self.group, no_dist=_no_dist())
        else:
            dcp.save(state, storage_writer=writer, no_dist=_no_dist())
            self._publish()

    def wait(self) -> None:
        """Finish (and publish) a save still being written in the background."""
        if self.pending is not None:
            self.pending.result()
            self.pending = None
            self._publish()

    def _publish(self) -> None:
        d = self.d
        d.barrier()
        if d.main:
            final, old = self.root / "resume", self.root / "resume.old"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                final.rename(old)
            (self.root / "resume.tmp").rename(final)
            shutil.rmtree(old, ignore_errors=True)
        d.barrier()


def read_resume_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a resume folder, whole and on the CPU, in this one process (inspection, tests)."""
    reader = HuggingFaceStorageReader(os.fspath(Path(path) / "dcp"))
    out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in reader.read_metadata().state_dict_metadata.items()}
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


def load_resume(path: Path, model_cfg: LIDiTConfig, named, ema: EMA, opt: torch.optim.Optimizer, stream,
                dropout_rng: np.random.Generator, noise_gen: torch.Generator, cfg: TrainConfig, d: Dist) -> dict:
    """Load a resume state in place, resharded to this run's world size and parallelism.

    At the saved world size every rank also gets its own RNG and data position back: the run
    continues bit for bit. At another world size the weights, EMA and optimiser state are still
    exact, but the dropout and noise RNGs are fresh (seeded by seed, rank and step) and each rank
    takes the data state of the same rank number, if there was one.
    """
    meta = json.loads((path / "state.json").read_text())
    if meta.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path} is not a {RESUME_FORMAT} resume state (format {meta.get('format')!r})")
    if meta["model_config"] != json.loads(model_cfg.to_json()):
        raise ValueError(f"{path} was saved for another model config")
    reader = HuggingFaceStorageReader(os.fspath(path / "dcp"))
    params = dict(named)
    targets = {}
    for name, p in named:
        targets[f"model.{name}"] = p.detach()
        targets[f"ema.{name}"] = sharded_like(ema.shadow[name], p)
    optim: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
    for key, m in reader.read_metadata().state_dict_metadata.items():
        if key.startswith("optim."):
            name, _, field = key.removeprefix("optim.").rpartition(".")
            if name not in params:
                raise ValueError(f"{path} holds optimiser state for {name}, which this run does not train")
            p = params[name]
            whole = tuple(m.size) == tuple(p.shape)  # moments, sharded like the parameter; else e.g. the step count
            dtype = m.properties.dtype
            value = torch.zeros_like(p.detach(), dtype=dtype) if whole else torch.zeros(m.size, dtype=dtype)
            optim.setdefault(p, {})[field] = targets[key] = value
    dcp.load(targets, storage_reader=reader, no_dist=_no_dist())
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    opt.load_state_dict({"state": {index[id(p)]: s for p, s in optim.items()},
                         "param_groups": opt.state_dict()["param_groups"]})
    rng_file = path / f"rng-rank{d.rank}.json"
    rng = json.loads(rng_file.read_text()) if rng_file.is_file() else None
    if rng is not None:
        stream.load_state_dict(rng["data"])
    if meta["world_size"] == d.world:
        dropout_rng.bit_generator.state = rng["dropout"]
        noise_gen.set_state(torch.frombuffer(bytearray.fromhex(rng["noise"]), dtype=torch.uint8))
    else:
        fresh_dropout, fresh_noise = rank_rngs(cfg.seed, d.rank, d.device, meta["step"])
        dropout_rng.bit_generator.state = fresh_dropout.bit_generator.state
        noise_gen.set_state(fresh_noise.get_state())
        if d.main:
            warnings.warn(f"{path} was saved by {meta['world_size']} processes and resumes on {d.world}: weights, EMA "
                          f"and optimiser state are exact, but the data order and noise differ from an "
                          f"uninterrupted run", stacklevel=2)
    return meta
