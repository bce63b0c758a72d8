"""The training loop and the command line (`python -m lidit.train`)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import read_config
from ..diffusion import training_loss
from ..precision import native_bf16
from .build import build_model
from .config import TrainConfig, llm_folders, load_config, model_config
from .dist import say, setup_processes
from .inputs import make_stream, text_sources
from .optim import EMA, make_optimizer, weights_hash
from .progress import Progress
from .schedule import ema_decay_at, lr_at
from .state import ResumeSaver, command_line, load_resume, rank_rngs, save_model
from .watch import Watch

_STARTED: float | None = time.time()  # the wall-clock budget counts from process start, feature caching included


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
    sources, feature_stats = text_sources(cfg, model_cfg, folders, stream, d)
    t_features = time.perf_counter() - t_features
    say(d, f"text features ({cfg.text_features}) ready in {t_features:.1f} s "
           f"({sum(s['encoded'] for s in feature_stats)} captions encoded)")

    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and native_bf16(d.device))
    model, net = build_model(model_cfg, cfg, d, sources, bf16)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # LoRA: the adapters only
    opt = make_optimizer(cfg, named, d.device)
    ema = EMA(named)
    dropout_rng, noise_gen = rank_rngs(cfg.seed, d.rank, d.device)

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
    watch = Watch(cfg, model_cfg, out, d, folders, step)
    saver = ResumeSaver(out, d, cfg.async_checkpoint)
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
                 f"{os.cpu_count()} cpus".strip(), "cpu_kernels": torch.backends.cpu.get_cpu_capability(), "gpu": torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else None,
                 "torch": torch.__version__, "features": feature_stats, "feature_seconds": round(t_features, 2)}
        extra = {"training_command": command_line(argv), "training_config": json.dumps(cfg.to_dict()),
                 "training_stats": json.dumps(stats, default=str)}
        save_model(out / "model.safetensors", model, ema, cfg, extra, d)
        saver.save(step, named, ema, opt, stream, dropout_rng, noise_gen, cfg, model_cfg, info())

    net.train()
    stop = False
    while step < cfg.steps and not stop:
        t0 = time.perf_counter()
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=d.device)  # summed on the device: no sync per step
        for k in range(cfg.grad_accum):
            x0, captions, *mapped = stream.next_batch(micro)  # shards also hand each branch's memory-mapped states
            if cfg.caption_dropout > 0:
                drop = dropout_rng.random(len(captions)) < cfg.caption_dropout
                captions = ["" if dropped else c for c, dropped in zip(captions, drop)]
            entries = mapped[0] if mapped and mapped[0] else [None] * len(sources)
            texts = [src.states(captions, d.device, e) for src, e in zip(sources, entries)]
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
            step_seconds = float(np.mean(step_times[-len(window):]))
            row = {"step": step, "loss": round(mean_loss, 6), "lr": lr, "grad_norm": round(gn, 4), "images": images_seen,
                   "seconds": round(prior_seconds + time.perf_counter() - t_loop, 2),
                   "step_seconds": round(step_seconds, 4), **watch.throughput(step_seconds)}
            if d.main:
                with log_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                watch.scalars(step, row)
            window = []
        watch.after_step(step, model, ema, log_path)
        progress.update(step, logged, lr)
        out_of_time = budget is not None and d.agree(time.time() - started + step_times[-1] > budget)
        stop = out_of_time or (stop_after is not None and step - start_step >= stop_after)
        if stop and out_of_time:
            say(d, f"\nwall-clock budget of {cfg.max_minutes} min reached at step {step}")
        if step % cfg.checkpoint_every == 0 and step < cfg.steps and not stop:
            checkpoint()
    progress.close()
    checkpoint()
    saver.wait()
    watch.close()
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
