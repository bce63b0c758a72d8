"""What a run leaves: model.safetensors (or lora.safetensors) and an exact resume state."""
from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import save_checkpoint
from ..config import LIDiTConfig
from ..lora import save_lora
from ..model import LIDiTModel
from .config import DTYPES, TrainConfig
from .dist import Dist, shard_of
from .optim import EMA

RESUME_FORMAT = "lidit-resume-v1"


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
                tensors[f"optim.{name}.{key}"] = shard_of(value).detach().cpu().contiguous()
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
        tensors = {f"model.{n}": shard_of(p).detach().cpu().contiguous() for n, p in named}
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
            shard_of(p).copy_(tensors[f"model.{name}"])
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
