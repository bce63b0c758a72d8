"""The learning-rate and EMA-decay schedules, functions of the step."""
from __future__ import annotations

import math

from .config import TrainConfig


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
