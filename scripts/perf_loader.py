"""Loader throughput: how many images (or latents) per second the shard stream delivers, by worker count.

    .venv/bin/python scripts/perf_loader.py --items 3000 --workers 0 2 4 --rounds 3

Writes synthetic shards (random 256-px pixels or SD3-sized latents, three buckets), then times
`ShardStream.next_batch` after a warm-up, alternating the worker counts over `--rounds` rounds, and
prints the mean rate with a 95% t-interval. It also prints the rate the loader must beat: 5x the
training step rate of the 1B preset on one H100, from the model's FLOPs per image (counted with
torch's FlopCounterMode on the meta device: no weights are allocated).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as save_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lidit.config import preset  # noqa: E402
from lidit.data.shards import FORMAT, ShardStream, _ShardWriter  # noqa: E402
from lidit.model import LIDiTModel  # noqa: E402
from lidit.states import TextStates  # noqa: E402

T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
H100_BF16_FLOPS = 989e12  # dense bf16 peak
MFU = 0.4                 # a good large-model training utilisation


def write_shards(root: Path, items: int, shard_size: int, kind: str, resolution: int) -> None:
    rng = np.random.default_rng(0)
    buckets = [(resolution, resolution), (resolution * 9 // 8, resolution * 7 // 8), (resolution * 7 // 8, resolution * 9 // 8)]
    buckets = [(w // 16 * 16, h // 16 * 16) for w, h in buckets]
    writer = _ShardWriter(root, shard_size)
    from PIL import Image

    for i in range(items):
        b = i % len(buckets)
        w, h = buckets[b]
        if kind == "pixels":
            buf = io.BytesIO()
            # smooth noise compresses like a photo more than white noise does
            small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(buf, format="PNG", compress_level=1)
            blobs = {"png": buf.getvalue()}
        else:
            mean = torch.from_numpy(rng.standard_normal((16, h // 8, w // 8), dtype=np.float32)).half()
            blobs = {"latent": save_bytes({"mean": mean, "std": (mean.abs() * 0.1).contiguous()})}
        writer.add(f"{i:09d}", b, f"synthetic caption number {i} with a few more words", blobs)
    index = {"format": FORMAT, "kind": kind, "buckets": [list(b) for b in buckets], "resolution": resolution,
             "step": 16, "shards": writer.finish(), "latent_scale": [1.5305, 0.0609],
             "latent_channels": 16 if kind == "latents" else 0}
    (root / "index.json").write_text(json.dumps(index))


def rate(root: Path, workers: int, micro: int, batches: int) -> float:
    stream = ShardStream(root, micro, seed=0, workers=workers, prefetch=4)
    for _ in range(max(2, workers)):  # warm-up: worker start-up is paid once per run, not per batch
        stream.next_batch()
    t0 = time.perf_counter()
    for _ in range(batches):
        stream.next_batch()
    seconds = time.perf_counter() - t0
    stream.close()
    return batches * micro / seconds


def flops_per_image(name: str, resolution: int, text_tokens: int = 120) -> float:
    """Training FLOPs per image (forward x 3) of a preset: counted at DiT depth 1 and 2 on the CPU,
    extrapolated per block to the preset's depth (every block costs the same)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = preset(name)
    counts = []
    for depth in (1, 2):
        small = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, depth=depth))
        model = LIDiTModel(small)
        side = resolution // 8 if cfg.latent_format != "pixel" else resolution
        x = torch.zeros(1, cfg.dit.in_channels, side, side)
        mask = torch.ones(1, text_tokens, dtype=torch.bool)
        texts = [TextStates(torch.randn(1, text_tokens, b.hidden_size), mask, mask.clone()) for b in cfg.text.branches]
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, torch.zeros(1), texts)
        counts.append(counter.get_total_flops())
        del model
    per_block = counts[1] - counts[0]
    return 3 * (counts[0] + (cfg.dit.depth - 1) * per_block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--kind", choices=["latents", "pixels"], nargs="+", default=["latents", "pixels"])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--micro", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    per_image = flops_per_image("lidit-1b", args.resolution)
    step_rate = H100_BF16_FLOPS * MFU / per_image
    print(f"lidit-1b at {args.resolution} px: {per_image / 1e12:.2f} TFLOP per training image -> "
          f"{step_rate:.0f} images/s on one H100 at {MFU:.0%} MFU; loader goal (5x): {5 * step_rate:.0f} images/s")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kind:
            root = Path(tmp) / kind
            root.mkdir()
            t0 = time.perf_counter()
            write_shards(root, args.items, args.shard_size, kind, args.resolution)
            size = sum(f.stat().st_size for f in root.glob("*.tar")) / 2**20
            print(f"{kind}: {args.items} items in {args.items // args.shard_size} shards, {size:.0f} MiB, "
                  f"written in {time.perf_counter() - t0:.1f} s")
            rates: dict[int, list[float]] = {w: [] for w in args.workers}
            for _ in range(args.rounds):
                for w in args.workers:
                    rates[w].append(rate(root, w, args.micro, args.batches))
            for w, r in rates.items():
                n = len(r)
                half = T95[n - 1] * statistics.stdev(r) / n ** 0.5 if n > 1 else float("nan")
                mean = statistics.mean(r)
                print(f"  {kind} workers={w}: {mean:8.0f} +- {half:.0f} images/s (n={n} rounds x {args.batches} "
                      f"batches of {args.micro}; {mean / (5 * step_rate):.2f}x the goal)")


if __name__ == "__main__":
    main()
