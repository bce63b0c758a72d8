"""`python -m lidit train` (also `python -m lidit.train` and `torchrun ... -m lidit.train`)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

from .config import TrainConfig, load_config, model_config
from .trainer import train

_STARTED: float | None = time.time()  # the wall-clock budget counts from process start, feature caching included


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m lidit train", description="Train an LI-DiT from a JSON config.")
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
