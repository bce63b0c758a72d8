"""Training memory per rank of the 1B and 10B presets under FSDP2, with and without activation checkpointing.

    .venv/bin/python scripts/perf_train_memory.py --ranks 8 --micro 8

No GPU is needed: parameter, gradient and optimiser bytes follow from the parameter counts (meta
device); activation bytes are MEASURED on the CPU by running the preset's real layers at DiT depth
1 and 2 (batch 1, bf16 weights and compute as under FSDP2's bf16 policy, the preset's resolution and
120 text tokens per LLM) and counting
every tensor autograd saves for the backward (each storage once). The difference is one block; the
rest (text pathway, embedders, final layer) is the depth-1 figure minus one block. Per rank:

    sharded state  = (fp32 params + fp32 grads + 2 AdamW moments + fp32 EMA) / ranks = 20 bytes x P / ranks
    gathered       = 2 units x bf16 params of the largest FSDP unit (the one computing, the one prefetched)
    activations    = micro x (depth x per-block + rest), plus one full block being recomputed with AC
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lidit.config import preset  # noqa: E402
from lidit.model import LIDiTModel  # noqa: E402
from lidit.states import TextStates  # noqa: E402

GiB = 2**30


def saved_bytes(cfg, checkpointing: bool, text_tokens: int, resolution: int) -> int:
    """Bytes autograd keeps for the backward of one image at `resolution` (each storage counted once)."""
    model = LIDiTModel(cfg).to(torch.bfloat16)  # as FSDP2's bf16 policy computes: no per-call weight casts
    model.dit.checkpointing = checkpointing
    side = resolution // 8 if cfg.latent_format != "pixel" else resolution
    x = torch.randn(1, cfg.dit.in_channels, side, side, dtype=torch.bfloat16)
    mask = torch.ones(1, text_tokens, dtype=torch.bool)
    texts = [TextStates(torch.randn(1, text_tokens, b.hidden_size), mask, mask.clone()) for b in cfg.text.branches]
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter) and t.device.type != "meta":
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, torch.rand(1), texts)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    del out, model
    return sum(n for ptr, n in storages.items() if ptr not in params)


def unit_params(cfg) -> tuple[int, int]:
    """(all parameters, the largest FSDP unit: a DiT block) on the meta device."""
    with torch.device("meta"):
        model = LIDiTModel(cfg)
    block = max(sum(p.numel() for p in b.parameters()) for b in model.dit.blocks)
    return sum(p.numel() for p in model.parameters()), block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["lidit-1b", "lidit-10b"])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--micro", type=int, default=8, help="images per rank per micro-batch")
    parser.add_argument("--text-tokens", type=int, default=120)
    parser.add_argument("--measure-resolution", type=int, help="measure at this resolution and scale the image "
                        "part linearly in tokens to the preset's (what flash attention's O(tokens) memory allows; "
                        "10B at 1024 px does not fit this machine's RAM)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"FSDP2 at {args.ranks} ranks, micro-batch {args.micro} images per rank, bf16 compute, fp32 master "
          f"weights/grads/AdamW/EMA; activations measured at depth 1 and 2 on the CPU")
    print("| preset | params | sharded state / rank | gathered units | activations / rank (no AC) | "
          "total (no AC) | activations / rank (AC) | total (AC) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.presets:
        cfg = preset(name)
        total, block = unit_params(cfg)
        sharded = 20 * total / args.ranks
        gathered = 2 * 2 * block
        row = [name, f"{total / 1e9:.2f} B", f"{sharded / GiB:.1f} GiB", f"{gathered / GiB:.2f} GiB"]
        full_block = 0
        for ac in (False, True):
            at = args.measure_resolution or cfg.resolution
            one, two = (saved_bytes(dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, depth=d)), ac,
                                    args.text_tokens, at) for d in (1, 2))
            scale = (cfg.resolution / at) ** 2  # image tokens
            per_block, rest = (two - one) * scale, (2 * one - two) * scale  # rest: mostly image-sized too
            # with AC the backward recomputes one block at a time: its full activations exist once more
            acts = args.micro * (cfg.dit.depth * per_block + rest + full_block)
            full_block = per_block
            row += [f"{acts / GiB:.1f} GiB ({per_block / 2**20:.1f} MiB/block/image)",
                    f"{(sharded + gathered + acts) / GiB:.1f} GiB"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
