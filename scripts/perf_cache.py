"""What a step cache costs on LI-DiT: stock EasyCache and LazyCache at their defaults, through
ComfyUI's sampling (KSampler's path), on the real demo checkpoint and LLMs.

For each benchmark prompt (the "plain" set, combinations training never saw), the same noise is
sampled without a cache and with each cache, in turn, so drifts of a shared machine hit all
three alike. Reported, every figure over the n prompts with its 95% interval:
- the time of a sampling run with the cache over the time without (t-interval of the per-prompt
  ratios), and the steps the cache skipped;
- object accuracy (the scene checker reads every object back) with and without, and the
  difference paired by prompt (cluster bootstrap over prompts, `lidit.study.stats.difference`);
  a difference is called only where its interval excludes 0.

    .venv/bin/python scripts/perf_cache.py --count 100          # the docs' table (minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "host"))

import inproc  # noqa: E402  (ComfyUI + the pack in this process, as the tests use them)


def t_interval(values: list[float]) -> tuple[float, float]:
    from scipy.stats import t

    mean = statistics.fmean(values)
    return mean, t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "lidit-demo.safetensors"))
    parser.add_argument("--llm", action="append", default=None, help="LLM folder names in models/LLM")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--steps", type=int, default=None, help="default: the checkpoint's")
    args = parser.parse_args()

    inproc.load_pack()
    import logging

    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

    from lidit.study import scenes, stats

    host = inproc.sub("nodes.host_model")
    model = host.load_lidit(args.checkpoint)
    config = host.lidit_config_of(model)
    llms = inproc.load_llms(args.llm or [b.name for b in config.text.branches])
    steps = args.steps or config.steps
    variants = {"none": model}
    for node, name in ((EasyCacheNode, "EasyCache"), (LazyCacheNode, "LazyCache")):
        variants[name] = node.execute(model, reuse_threshold=0.2, start_percent=0.15, end_percent=0.95,
                                      verbose=False).result[0]
    forwards: list[int] = []
    inner = host.LIDiTHostNet._forward

    def counted(self, *a, **k):
        forwards.append(1)
        return inner(self, *a, **k)
    host.LIDiTHostNet._forward = counted
    logging.getLogger().setLevel(logging.WARNING)

    examples = scenes.PROMPT_SETS["plain"].examples(args.seed, args.count)
    neg = inproc.conditioning(model, llms, "")
    seconds = {v: [] for v in variants}
    skipped = {v: [] for v in variants}
    correct = {v: [] for v in variants}
    for m in variants.values():  # warm-up
        inproc.ksample(m, neg, neg, seed=0, steps=steps)
    for i, example in enumerate(examples):
        pos = inproc.conditioning(model, llms, example.prompt)
        for name, m in variants.items():
            forwards.clear()
            start = time.perf_counter()
            x = inproc.ksample(m, pos, neg, seed=args.seed + i, steps=steps)
            seconds[name].append(time.perf_counter() - start)
            skipped[name].append(steps - len(forwards))
            image = scenes.to_uint8(((x[0].float() + 1) / 2).clamp(0, 1))
            correct[name].append([g == w for g, w in zip(scenes.read_scene(image, example.scene.n), example.scene.pairs())])
        print(f"prompt {i + 1}/{len(examples)}", file=sys.stderr, flush=True)

    def counts(name: str) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([[sum(row) for row in correct[name]]], dtype=float),
                np.array([[len(row) for row in correct[name]]], dtype=float))

    n = len(examples)
    print(f"{Path(args.checkpoint).name}, {steps} steps, cfg {config.cfg}, {config.resolution} px, "
          f"{n} prompts (plain set, seed {args.seed}), {torch.get_num_threads()} threads, {model.model.get_dtype()}")
    print("| cache (defaults) | steps skipped, mean (95% CI) | time vs none (95% CI) | object accuracy (95% CI) | "
          "accuracy minus none (95% CI) |")
    print("|---|---|---|---|---|")
    for name in variants:
        acc = stats.cluster_bootstrap(*counts(name))
        skip, skip_half = t_interval([float(s) for s in skipped[name]]) if name != "none" else (0.0, 0.0)
        if name == "none":
            time_cell, diff_cell = f"{statistics.fmean(seconds[name]):.3f} s per image", "-"
        else:
            ratio, half = t_interval([a / b for a, b in zip(seconds[name], seconds["none"])])
            diff = stats.difference([counts(name)], [counts("none")])
            time_cell = f"{ratio:.3f}x ± {half:.3f}"
            diff_cell = f"{100 * diff.value:+.1f} pts ({100 * diff.lo:+.1f}, {100 * diff.hi:+.1f})"
        print(f"| {name} | {skip:.1f} of {steps} ± {skip_half:.1f} | {time_cell} | "
              f"{100 * acc.value:.1f}% ({100 * acc.lo:.1f}, {100 * acc.hi:.1f}) | {diff_cell} |")


if __name__ == "__main__":
    main()
