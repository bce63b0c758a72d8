"""What a researcher watches during a run: TensorBoard scalars beside log.jsonl, a sample grid of
fixed prompts, and the prompt-following benchmark; grids and benchmark are drawn by rank 0 with the
EMA weights (the weights `model.safetensors` gets)."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..config import LIDiTConfig
from ..diffusion import sample
from ..model import LIDiTModel
from ..study import scenes
from ..study.benchmark import save_grid
from ..text_encoder_file import TextEncoderFile
from ..vae import to_pixels
from .config import TrainConfig
from .dist import Dist
from .inputs import cache_features
from .optim import EMA
from .state import ema_model

EVAL_SEED = 1234    # `python -m lidit.eval run`'s default: the same held-out scenes and the same noise
SAMPLE_PROMPTS = 8  # default grid: the first held-out scene prompts


class Watch:
    def __init__(self, cfg: TrainConfig, model_cfg: LIDiTConfig, out: Path, d: Dist,
                 folders: list[Path | TextEncoderFile], start_step: int) -> None:
        # every rank checks, before any collective: a rank that raised alone would hang the others
        if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ImportError("tensorboard: true needs the tensorboard package (pip install tensorboard)")
        draws = cfg.sample_every > 0 or cfg.benchmark_every > 0
        self.latent_factor = 1 if model_cfg.latent_format == "pixel" else 8
        if draws and self.latent_factor > 1 and not cfg.data.vae:
            raise ValueError("sample_every / benchmark_every on a latent model decode with data.vae: set it to the "
                             "diffusers AutoencoderKL folder")
        self.cfg, self.d, self.out = cfg, d, out
        self.writer = None
        if cfg.tensorboard and d.main:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run hides what an earlier invocation logged after the resumed step
            self.writer = SummaryWriter(os.fspath(out / "tb"), purge_step=start_step + 1 if start_step else None)
        side = model_cfg.resolution // self.latent_factor
        self.tokens_per_image = (side // model_cfg.dit.patch) ** 2  # nominal: buckets hold about as many pixels
        self.prompts = (cfg.sample_prompts or [e.prompt for e in scenes.eval_set(EVAL_SEED, SAMPLE_PROMPTS)]
                        if cfg.sample_every else [])
        self.examples = scenes.eval_set(EVAL_SEED, cfg.benchmark_count) if cfg.benchmark_every else []
        wanted = self.prompts + [e.prompt for e in self.examples]
        # their own cached features: the training captions' tables (and FeatureNorm statistics) stay as they are
        self.texts = cache_features(cfg, model_cfg, folders, wanted, d)[0] if wanted else []

    def throughput(self, step_seconds: float) -> dict:
        """Images and DiT tokens per second over the logging interval, and peak GPU memory."""
        images = self.cfg.batch_size / max(step_seconds, 1e-9)
        out = {"images_per_s": round(images, 3), "tokens_per_s": round(images * self.tokens_per_image, 1)}
        if self.d.device.type == "cuda":
            out["gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(self.d.device) / 2**30, 3)
        return out

    def scalars(self, step: int, row: dict) -> None:
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, step)

    def after_step(self, step: int, model: LIDiTModel, ema: EMA, log_path: Path) -> None:
        """The sample grid and the benchmark when due; every rank calls this (the EMA gather is collective)."""
        grid = self.cfg.sample_every > 0 and step % self.cfg.sample_every == 0
        bench = self.cfg.benchmark_every > 0 and step % self.cfg.benchmark_every == 0
        if not (grid or bench):
            return
        state = ema.full_state(model)
        if self.d.main:
            net = ema_model(model, state, self.cfg).to(self.d.device).eval()
            if grid:
                self._grid(step, net)
            if bench:
                self._benchmark(step, net, log_path)
        self.d.barrier()

    def _draw(self, net: LIDiTModel, prompts: list[str]) -> torch.Tensor:
        dev = self.d.device
        cond = [table.states(prompts, dev) for table in self.texts]
        uncond = [table.states([""] * len(prompts), dev) for table in self.texts]
        side = net.config.resolution // self.latent_factor
        x = sample(net, net.config, cond, uncond, (len(prompts), net.config.dit.in_channels, side, side),
                   self.cfg.sample_steps, seed=EVAL_SEED, device=dev)
        return to_pixels(x.float().cpu(), net.config, self.cfg.data.vae)

    def _grid(self, step: int, net: LIDiTModel) -> None:
        path = self.out / "samples" / f"step-{step:06d}.png"
        path.parent.mkdir(exist_ok=True)
        save_grid(list(self._draw(net, self.prompts)), self.prompts, path)
        if self.writer is not None:
            from PIL import Image

            self.writer.add_image("samples", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def _benchmark(self, step: int, net: LIDiTModel, log_path: Path) -> None:
        images = self._draw(net, [e.prompt for e in self.examples])
        summary = scenes.score(list(images), [e.scene for e in self.examples]).summary()
        result = {"object_accuracy": summary["object_accuracy"], "prompt_accuracy": summary["prompt_accuracy"],
                  "prompts": len(self.examples)}
        with log_path.open("a") as f:
            f.write(json.dumps({"step": step, "benchmark": result}) + "\n")
        if self.writer is not None:
            for key in ("object_accuracy", "prompt_accuracy"):
                self.writer.add_scalar(f"benchmark/{key}", result[key], step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
