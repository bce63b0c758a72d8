"""The training run as a `Trainer` with one method per step of it, the way torchtitan splits its trainer.

`Trainer(cfg)` sets the run up (processes, data, text sources, model, optimiser, resume state);
`run()` repeats `train_step()` (micro-batches through `forward_backward()`, then one guarded
optimiser step), `log()` and `checkpoint()` until the step count, the wall-clock budget or
`stop_after` ends it.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import read_config
from ..diffusion import distillation_loss, training_loss
from ..precision import native_bf16
from ..states import TextStates
from .build import build_model
from .config import TrainConfig, llm_folders, model_config
from .dist import say, setup_processes
from .inputs import make_stream, text_sources
from .optim import EMA, make_optimizer, weights_hash
from .progress import Progress
from .schedule import ema_decay_at, lr_at
from .state import ResumeSaver, command_line, load_resume, rank_rngs, save_model
from .teacher import Teacher
from .watch import Watch


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | Path | None = None, argv: Sequence[str] = (),
                 started: float | None = None) -> None:
        """`resume`: a resume folder to continue from; `started`: the time.time() the wall-clock
        budget counts from (default: now); `argv`: the command line, recorded in the checkpoint."""
        self.cfg, self.argv = cfg, argv
        self.started = time.time() if started is None else started
        self.d = d = setup_processes(cfg.device, cfg.fsdp)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.output_dir)
        lora = cfg.lora_config()
        base = lora.base if lora else cfg.init
        self.model_cfg = read_config(base) if base else model_config(cfg.model, cfg.data.resolution)
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        d.barrier()
        per_step = d.world * cfg.grad_accum
        if cfg.batch_size % per_step:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by processes x grad_accum = {per_step}")
        self.micro = cfg.batch_size // per_step
        self._setup_data()
        self.bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and native_bf16(d.device))
        self.model, self.net = build_model(self.model_cfg, cfg, d, self.sources, self.bf16)
        self.named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]  # LoRA: the adapters only
        self.opt = make_optimizer(cfg, self.named, d.device)
        self.ema = EMA(self.named)
        self.dropout_rng, self.noise_gen = rank_rngs(cfg.seed, d.rank, d.device)
        teacher = cfg.teacher_config()
        self.teacher = Teacher(teacher, d.device) if teacher else None
        self.step, self.prior_seconds, self.images_seen, self.skipped = 0, 0.0, 0, 0
        self.window: list = []  # per-step losses (device tensors) since the last log line
        if resume:
            self._resume(Path(resume))
        self._setup_outputs(resumed=resume is not None)

    def _setup_data(self) -> None:
        """The image stream, and per LLM branch its text source (the frozen LLMs run here, then never again)."""
        cfg, d = self.cfg, self.d
        self.folders = llm_folders(cfg, self.model_cfg)
        self.stream = make_stream(cfg, self.model_cfg, d, self.micro, self.model_cfg.resolution)
        t0 = time.perf_counter()
        self.sources, self.feature_stats = text_sources(cfg, self.model_cfg, self.folders, self.stream, d)
        self.feature_seconds = time.perf_counter() - t0
        say(d, f"text features ({cfg.text_features}) ready in {self.feature_seconds:.1f} s "
               f"({sum(s['encoded'] for s in self.feature_stats)} captions encoded)")

    def _resume(self, folder: Path) -> None:
        meta = load_resume(folder, self.model_cfg, self.named, self.ema, self.opt, self.stream, self.dropout_rng,
                           self.noise_gen, self.cfg, self.d)
        self.step, self.images_seen = meta["step"], meta.get("images_seen", 0)
        self.prior_seconds = meta.get("train_seconds", 0.0)
        self.window = list(meta.get("loss_window", []))
        say(self.d, f"resumed from {folder} at step {self.step}")

    def _setup_outputs(self, resumed: bool) -> None:
        """The log (a fresh run starts a fresh one; a resumed one drops what came after its state),
        the watchers, the resume saver and the progress line."""
        cfg, d = self.cfg, self.d
        self.budget = cfg.max_minutes * 60 if cfg.max_minutes else None
        self.log_path = self.out / "log.jsonl"
        if d.main:
            kept = [] if not resumed or not self.log_path.exists() else [
                line for line in self.log_path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
            self.log_path.write_text("".join(line + "\n" for line in kept))
        self.watch = Watch(cfg, self.model_cfg, self.out, d, self.folders, self.step)
        self.saver = ResumeSaver(self.out, d, cfg.async_checkpoint)
        deadline = self.started + self.budget if self.budget else None
        self.progress = Progress(cfg.progress, cfg.steps, self.step, cfg.log_every, d.main, deadline)
        self.last_loss = float("nan")
        self.grad_norm = torch.zeros(())
        self.step_times: list[float] = []
        self.t_loop = time.perf_counter()

    # --- one step -------------------------------------------------------------------------------
    def next_micro_batch(self) -> tuple[torch.Tensor, list[TextStates], list[str]]:
        """Images on the device, each branch's text states and the captions, dropped to the empty prompt
        (the unconditional input of classifier-free guidance) at `caption_dropout`."""
        x0, captions, *mapped = self.stream.next_batch(self.micro)  # shards also hand each branch's mapped states
        if self.cfg.caption_dropout > 0:
            drop = self.dropout_rng.random(len(captions)) < self.cfg.caption_dropout
            captions = ["" if dropped else c for c, dropped in zip(captions, drop)]
        entries = mapped[0] if mapped and mapped[0] else [None] * len(self.sources)
        texts = [src.states(captions, self.d.device, e) for src, e in zip(self.sources, entries)]
        return x0.to(self.d.device), texts, captions

    def forward_backward(self, x0: torch.Tensor, texts: list[TextStates], captions: list[str], sync: bool) -> torch.Tensor:
        """The loss of one micro-batch (denoising, or distillation from the teacher), its gradients
        accumulated; `sync`: reduce them across ranks now."""
        net = self.net
        if hasattr(net, "set_requires_gradient_sync"):  # FSDP2
            net.set_requires_gradient_sync(sync)
        ctx = net.no_sync() if not sync and hasattr(net, "no_sync") else contextlib.nullcontext()
        with ctx, torch.autocast(self.d.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.teacher is not None:
                teacher = functools.partial(self.teacher.predict, self.model, captions=captions)
                loss = distillation_loss(net, teacher, self.model_cfg, x0, texts, generator=self.noise_gen)
            else:
                loss = training_loss(net, self.model_cfg, x0, texts, generator=self.noise_gen, flow_loss=self.cfg.flow_loss)
            (loss / self.cfg.grad_accum).backward()
        return loss.detach().float()

    def train_step(self) -> float:
        """One optimiser step over `grad_accum` micro-batches; returns the learning rate it used.

        A NaN or inf loss or gradient never reaches the weights: all ranks agree to skip the step.
        """
        cfg = self.cfg
        lr = lr_at(cfg, self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.d.device)  # summed on the device: no sync per micro-batch
        for k in range(cfg.grad_accum):
            x0, texts, captions = self.next_micro_batch()
            total += self.forward_backward(x0, texts, captions, sync=k == cfg.grad_accum - 1) / cfg.grad_accum
        if cfg.grad_clip > 0:
            self.grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.named], cfg.grad_clip)
        finite = bool(torch.isfinite(total)) and bool(torch.isfinite(self.grad_norm))
        if self.d.mean([float(not finite)])[0] > 0:
            self._skip()
        else:
            self.opt.step()
            self.ema.update(ema_decay_at(cfg, self.step))
            self.window.append(total)
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.images_seen += cfg.batch_size
        return lr

    def _skip(self) -> None:
        self.skipped += 1
        say(self.d, f"step {self.step + 1}: non-finite loss or gradient, step skipped ({self.skipped} so far)")
        if self.d.main:
            with self.log_path.open("a") as f:
                f.write(json.dumps({"step": self.step + 1, "skipped": "non-finite loss or gradient",
                                    "skipped_total": self.skipped}) + "\n")

    # --- logging and checkpoints ----------------------------------------------------------------
    def log(self, lr: float) -> float | None:
        """Every `log_every` steps and at the last: the mean loss since the last line, over all ranks,
        to log.jsonl and the watchers. Returns the logged loss, or None when this step logs nothing."""
        cfg, d = self.cfg, self.d
        if not self.window or not (self.step % cfg.log_every == 0 or self.step == cfg.steps):
            return None
        gn = self.grad_norm
        gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        window = [float(x) for x in self.window]
        mean_loss, gn = d.mean([sum(window) / len(window), gn])
        step_seconds = float(np.mean(self.step_times[-len(window):]))
        row = {"step": self.step, "loss": round(mean_loss, 6), "lr": lr, "grad_norm": round(gn, 4),
               "images": self.images_seen, "seconds": round(self.train_seconds(), 2),
               "step_seconds": round(step_seconds, 4), **self.watch.throughput(step_seconds)}
        if d.main:
            with self.log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            self.watch.scalars(self.step, row)
        self.window = []
        self.last_loss = mean_loss
        return mean_loss

    def train_seconds(self) -> float:
        return self.prior_seconds + time.perf_counter() - self.t_loop

    def info(self) -> dict:
        """Where the run stands: kept in the resume state and in the checkpoint's stats."""
        return {"step": self.step, "images_seen": self.images_seen, "loss_window": [float(x) for x in self.window],
                "train_seconds": round(self.train_seconds(), 2),
                "wall_seconds_this_run": round(time.time() - self.started, 2), "last_loss": self.last_loss,
                "seconds_per_step": round(float(np.median(self.step_times)), 4) if self.step_times else None}

    def machine(self) -> dict:
        d = self.d
        return {"world_size": d.world, "fsdp": self.cfg.fsdp, "device": str(d.device), "threads": torch.get_num_threads(),
                "machine": f"{platform.machine()} {platform.processor()} {os.cpu_count()} cpus".strip(),
                "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
                "gpu": torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else None,
                "torch": torch.__version__}

    def checkpoint(self) -> None:
        """model.safetensors (the EMA weights, with the command, config and stats in its metadata) and resume/."""
        stats = {**{k: v for k, v in self.info().items() if k != "loss_window"}, **self.machine(),
                 "features": self.feature_stats, "feature_seconds": round(self.feature_seconds, 2)}
        extra = {"training_command": command_line(self.argv), "training_config": json.dumps(self.cfg.to_dict()),
                 "training_stats": json.dumps(stats, default=str)}
        save_model(self.out / "model.safetensors", self.model, self.ema, self.cfg, extra, self.d)
        self.saver.save(self.step, self.named, self.ema, self.opt, self.stream, self.dropout_rng, self.noise_gen,
                        self.cfg, self.model_cfg, self.info())

    # --- the run --------------------------------------------------------------------------------
    def out_of_time(self) -> bool:
        """Whether the next step would pass the wall-clock budget (all ranks agree)."""
        if self.budget is None:
            return False
        return self.d.agree(time.time() - self.started + self.step_times[-1] > self.budget)

    def run(self, stop_after: int | None = None) -> dict:
        """Train to `cfg.steps`, or for at most `stop_after` steps in this call, or until the budget
        runs out; save either way. Returns the final stats."""
        cfg, d = self.cfg, self.d
        first = self.step
        self.net.train()
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            lr = self.train_step()
            self.step_times.append(time.perf_counter() - t0)
            logged = self.log(lr)
            self.watch.after_step(self.step, self.model, self.ema, self.log_path)
            self.progress.update(self.step, logged, lr)
            out_of_time = self.out_of_time()
            if out_of_time:
                say(d, f"\nwall-clock budget of {cfg.max_minutes} min reached at step {self.step}")
            if out_of_time or (stop_after is not None and self.step - first >= stop_after):
                break
            if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self.checkpoint()
        return self.finish()

    def finish(self) -> dict:
        cfg, d = self.cfg, self.d
        self.progress.close()
        self.checkpoint()
        self.saver.wait()
        self.watch.close()
        result = {**self.info(), "output_dir": str(self.out), "feature_seconds": self.feature_seconds,
                  "features": self.feature_stats}
        if cfg.rank_hashes:
            hashes = {"weights": weights_hash(self.named), "ema": weights_hash(self.named, self.ema.shadow)}
            (self.out / f"rank{d.rank}.json").write_text(json.dumps({"rank": d.rank, "step": self.step, **hashes}))
        say(d, f"done: step {self.step}, loss {self.last_loss:.4f}, {result['train_seconds']:.0f} s training, "
               f"{time.time() - self.started:.0f} s in all -> {self.out / ('lora' if cfg.lora else 'model')}.safetensors")
        if d.on:
            d.barrier()
        return result


def train(cfg: TrainConfig, resume: str | Path | None = None, stop_after: int | None = None,
          argv: Sequence[str] = (), started: float | None = None) -> dict:
    """Run (or continue) training; returns the final stats. `stop_after`: at most this many steps
    in this invocation (then save, as the wall-clock budget does)."""
    return Trainer(cfg, resume, argv, started).run(stop_after)
