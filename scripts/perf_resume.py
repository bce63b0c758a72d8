"""How long a resume save blocks training: a synchronous DCP save against `async_save`'s stall, and the load.

    python scripts/perf_resume.py --depth 1 --out /tmp/bench-resume

One process on the CPU, LI-DiT-1B at the given DiT depth (weights, EMA and AdamW moments: 16 bytes per
trainable parameter); each mode runs `--rounds` times, alternating. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lidit.model import LIDiTModel  # noqa: E402
from lidit.train import TrainConfig, make_optimizer  # noqa: E402
from lidit.train.config import model_config  # noqa: E402
from lidit.train.dist import Dist  # noqa: E402
from lidit.train.optim import EMA  # noqa: E402
from lidit.train.state import ResumeSaver, load_resume, rank_rngs  # noqa: E402


class NoData:
    """The data stream's resume interface, with no state."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True, help="scratch folder (removed at the end)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = {"preset": "lidit-1b", "overrides": {"dit": {"depth": args.depth}}}
    model_cfg, cfg, cpu = model_config(spec), TrainConfig(model=spec), torch.device("cpu")
    named = list(LIDiTModel(model_cfg).named_parameters())
    opt = make_optimizer(cfg, named, cpu)
    for _, p in named:
        p.grad = torch.zeros_like(p)
    opt.step()  # AdamW's moments exist from the first step
    ema = EMA(named)
    result: dict = {"trainable_params_M": round(sum(p.numel() for _, p in named) / 1e6, 1)}
    for mode in ["sync", "async"] * args.rounds:
        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
        saver = ResumeSaver(args.out, Dist(), async_save=mode == "async")
        t0 = time.perf_counter()
        saver.save(1, named, ema, opt, NoData(), *rank_rngs(0, 0, cpu), cfg, model_cfg, {"step": 1})
        blocked = time.perf_counter() - t0
        saver.wait()
        result.setdefault(f"{mode}_blocking_s", []).append(round(blocked, 2))
        result.setdefault(f"{mode}_written_s", []).append(round(time.perf_counter() - t0, 2))
    result["resume_GB"] = round(sum(f.stat().st_size for f in (args.out / "resume").rglob("*") if f.is_file()) / 1e9, 3)
    t0 = time.perf_counter()
    load_resume(args.out / "resume", model_cfg, named, ema, opt, NoData(), *rank_rngs(0, 0, cpu), cfg, Dist())
    result["load_s"] = round(time.perf_counter() - t0, 2)
    shutil.rmtree(args.out, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
