"""Train an LI-DiT: `python -m lidit train --config <json> [key=value ...] [--resume] [--fsdp]`.

The same command runs on one process or under `torchrun --nproc_per_node N -m lidit train ...`
with DistributedDataParallel (gloo on CPU, nccl on GPU), or with FSDP2 (`--fsdp`: every DiT
block, token refiner block and collaborative block is its own shard unit).

One run, in order:
1. The config (a JSON file plus dotted `key=value` overrides) gives the model, the LLM folder per
   branch, the data, the optimiser and the output directory.
2. Every caption the data can produce, plus the empty prompt, is encoded once per LLM branch into
   the on-disk feature cache (`lidit.data.features`); the ranks split the missing captions. The LLMs
   are then released: the training loop never runs them.
3. The steps (`trainer.py`): AdamW, warmup + constant/cosine/linear schedule, gradient accumulation, gradient
   clipping, EMA, caption dropout (the empty prompt, encoded with the same template, which is the
   unconditional input at sampling), bf16 autocast where the device has native bf16 (GPUs, and
   CPUs with AVX512-BF16 or AMX).
4. Every `checkpoint_every` steps and at the end: `model.safetensors` (the EMA weights in the
   lidit checkpoint format, with the command, the training config and stats in its metadata) and
   `resume/` (raw weights, EMA and optimiser state through torch.distributed.checkpoint as one
   safetensors file per rank, optionally saved in the background; step, RNG and data position in
   JSON; nothing pickled). `--resume` continues the same step count, optimiser state and data order,
   or on another number of processes the same weights and optimiser state.
5. With `tensorboard`, `sample_every`, `benchmark_every`: TensorBoard scalars, sample grids and the
   prompt-following benchmark, drawn with the EMA weights (`watch.py`).
"""
from __future__ import annotations

from .config import DataConfig, TrainConfig, load_config, model_config
from .optim import decays, make_optimizer
from .schedule import ema_decay_at, lr_at
from .trainer import Trainer, train

__all__ = ["DataConfig", "TrainConfig", "decays", "ema_decay_at", "load_config", "lr_at", "make_optimizer",
           "model_config", "Trainer", "train"]
