"""LI-DiT-1B against ComfyUI's own PixArt-alpha (same depth, width, heads, patch) in one run.

Prints parameter counts and the time of one sampling step (a cond + uncond batch, as CFG runs
it) for both, and their ratios. LI-DiT's step includes its text pathway (two refiners and the
collaborative refiner, evaluated per step); the DiT-only line isolates the backbone.

    .venv/bin/python scripts/bench_pixart.py             # the real sizes (minutes on a CPU)
    .venv/bin/python scripts/bench_pixart.py --depth 2   # a quick smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, os.environ.get("COMFYUI_DIR") or str(REPO / ".comfyui" / "ComfyUI"))

from lidit.config import preset  # noqa: E402
from lidit.model import LIDiTModel  # noqa: E402
from lidit.text import TextStates  # noqa: E402


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Same small random weights for both nets: uninitialised memory can hold denormals that slow CPUs."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


def timed(fn, repeats: int) -> float:
    with torch.no_grad():
        fn()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=28)
    parser.add_argument("--resolution", type=int, default=384,
                        help="pixels; latents are 8x smaller (ComfyUI's PixArt cannot run 256: its PE base size rounds to 0)")
    parser.add_argument("--prompt-tokens", type=int, default=80)
    parser.add_argument("--instruction-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import comfy.cli_args
    comfy.cli_args.args.cpu = not torch.cuda.is_available()  # as `main.py --cpu` would
    import comfy.ops
    from comfy.ldm.pixart.pixartms import PixArtMS

    cfg = preset("lidit-1b")
    cfg = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, depth=args.depth))
    batch, side = 2, args.resolution // 8
    lidit = randomise(LIDiTModel(cfg))
    pixart = randomise(PixArtMS(depth=args.depth, hidden_size=1152, num_heads=16, patch_size=2, in_channels=4,
                                caption_channels=4096, model_max_length=120, micro_condition=False,
                                operations=comfy.ops.disable_weight_init))

    n = args.instruction_tokens + args.prompt_tokens
    prompt = torch.zeros(batch, n, dtype=torch.bool)
    prompt[:, args.instruction_tokens:] = True
    texts = [TextStates(torch.randn(batch, n, b.hidden_size), torch.ones(batch, n, dtype=torch.bool), prompt)
             for b in cfg.text.branches]
    t = torch.full((batch,), 0.5)
    x16 = torch.randn(batch, 16, side, side)
    context, mask, pooled = lidit.text(texts, t)
    x4 = torch.randn(batch, 4, side, side)
    t5 = torch.randn(batch, 1, 120, 4096)

    rows = {
        "LI-DiT-1B step (text pathway + DiT)": timed(lambda: lidit(x16, t, texts), args.repeats),
        "LI-DiT-1B DiT only": timed(lambda: lidit.dit(x16, t, context, mask, pooled), args.repeats),
        "PixArt-alpha XL/2 step (ComfyUI)": timed(lambda: pixart.forward_orig(x4, t * 1000, t5), args.repeats),
    }
    params = {"LI-DiT-1B": sum(p.numel() for p in lidit.parameters()),
              "PixArt-alpha XL/2": sum(p.numel() for p in pixart.parameters())}
    print(f"depth {args.depth}, {args.resolution}px ({side}x{side} latents), batch {batch}, "
          f"{torch.get_num_threads()} threads, fp32, {n} text tokens per LLM / 120 T5 tokens")
    for name, count in params.items():
        print(f"  params  {name:<38} {count / 1e6:10.1f} M")
    base = rows["PixArt-alpha XL/2 step (ComfyUI)"]
    for name, seconds in rows.items():
        print(f"  time    {name:<38} {seconds:10.3f} s   ratio to PixArt {seconds / base:5.2f}x")


if __name__ == "__main__":
    main()
