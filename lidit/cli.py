"""The command line: `python -m lidit <verb>`.

`info` and `generate` live here; the other verbs belong to the modules that do the work and are
handed the rest of the command line: `train` (lidit.train.cli), `convert shards`
(lidit.data.shards), `convert pixart` and `convert pathway` (lidit.pixart), `eval` (the prompt-following benchmark,
lidit.study.benchmark), `study pixart` (the PixArt proof, lidit.study.pixart_proof) and `study` (the
ablation study, lidit.study.ablation).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, read_config
from .config import PRESETS, LIDiTConfig, preset
from .diffusion import sample
from .instruction import PromptTemplate
from .llm import encode, load_llm
from .model import parameter_counts
from .precision import DTYPE_CHOICES, resolve_dtype
from .vae import to_pixels

#: verbs whose module parses the rest of the command line: verb -> (module[:function], help)
DELEGATED = {
    "train": ("lidit.train.cli", "train a model from a JSON config (also under torchrun)"),
    "convert shards": ("lidit.data.shards", "convert an image + caption folder to training shards"),
    "convert pixart": ("lidit.pixart", "convert a PixArt-alpha/Sigma transformer into an LI-DiT checkpoint"),
    "convert pathway": ("lidit.pixart:pathway_main", "keep only the LLM pathway of a checkpoint (LI-DiT From PixArt)"),
    "eval emoji": ("lidit.study.emoji_bench", "the emoji benchmark: ceiling, bench, variant study, grid"),
    "eval": ("lidit.study.benchmark", "the prompt-following benchmark: run, report, breakdown"),
    "study pixart": ("lidit.study.pixart_proof", "the CPU-scale proof of the PixArt route: teacher, conversion, "
                     "prompt-only distillation, from scratch, scored"),
    "study": ("lidit.study.ablation", "the ablation study: train and score every variant, resumable"),
}


def _config(target: str) -> LIDiTConfig:
    return preset(target) if target in PRESETS else read_config(target)


def info(args: argparse.Namespace) -> None:
    config = _config(args.target)
    print(json.dumps(config.to_dict(), indent=2))
    counts = parameter_counts(config)
    width = max(map(len, counts))
    for name, n in counts.items():
        print(f"{name:<{width}}  {n:>15,}  ({n / 1e6:,.2f} M)")


def generate(args: argparse.Namespace) -> None:
    from PIL import Image

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    dtype = resolve_dtype(args.dtype)
    model = load_checkpoint(args.checkpoint, dtype=dtype)
    config = model.config
    branches = config.text.branches
    if len(args.llm) != len(branches):
        expected = ", ".join(f"{b.name} (hidden {b.hidden_size})" for b in branches)
        raise SystemExit(f"this checkpoint has {len(branches)} LLM branches, in order: {expected}; got {len(args.llm)} --llm")
    if config.latent_format != "pixel" and not args.vae:
        raise SystemExit(f"this checkpoint makes {config.latent_format} latents: pass --vae <diffusers AutoencoderKL folder>")
    template = PromptTemplate.of(config.text)
    cond, uncond = [], []
    for folder, branch in zip(args.llm, branches):
        llm = load_llm(folder, layer=branch.layer, dtype=dtype)
        if llm.model.config.hidden_size != branch.hidden_size:
            raise SystemExit(f"{folder}: hidden size {llm.model.config.hidden_size}, but branch {branch.name} "
                             f"was trained with {branch.hidden_size}")
        cond.append(encode(llm, [args.prompt], template, config.text.max_tokens, branch.layer))
        uncond.append(encode(llm, [args.negative], template, config.text.max_tokens, branch.layer))
    factor = 1 if config.latent_format == "pixel" else 8
    height, width = (args.height or config.resolution) // factor, (args.width or config.resolution) // factor
    shape = (1, config.dit.in_channels, height, width)
    x = sample(model, config, cond, uncond, shape, args.steps, args.cfg, args.seed,
               callback=lambda i, n: print(f"\rstep {i}/{n}", end="", file=sys.stderr))
    print(file=sys.stderr)
    pixels = to_pixels(x, config, args.vae)[0]
    Image.fromarray((pixels.permute(1, 2, 0) * 255).round().byte().numpy()).save(args.out)
    print(f"wrote {args.out} ({pixels.shape[2]}x{pixels.shape[1]})")


def main(argv: list[str] | None = None) -> object:
    argv = sys.argv[1:] if argv is None else list(argv)
    for verb, (target, _) in DELEGATED.items():
        words = verb.split()
        if argv[:len(words)] == words:
            module, _, function = target.partition(":")
            return getattr(importlib.import_module(module), function or "main")(argv[len(words):])
    parser = argparse.ArgumentParser(prog="python -m lidit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for verb, (_, summary) in DELEGATED.items():
        sub.add_parser(verb, help=f"{summary} (python -m lidit {verb} --help)")
    p = sub.add_parser("info", help="print a preset's or checkpoint's config and parameter counts")
    p.add_argument("target", help=f"a preset ({', '.join(PRESETS)}) or a .safetensors checkpoint")
    p.set_defaults(run=info)
    p = sub.add_parser("generate", help="draw one image from a checkpoint and local LLM folders")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--llm", action="append", required=True, help="HF folder per LLM branch, in the checkpoint's order")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="default: the checkpoint's")
    p.add_argument("--cfg", type=float, help="default: the checkpoint's")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--vae", help="diffusers AutoencoderKL folder, for latent checkpoints")
    p.add_argument("--out", type=Path, default=Path("lidit.png"))
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="compute dtype of the LLMs and the model; auto: bf16 where the CPU has it natively, else fp32")
    p.set_defaults(run=generate)
    args = parser.parse_args(argv)
    return args.run(args)
