"""The prompt-following benchmark: the paper's Fig. 3 at small scale, on the synthetic scenes.

`python -m lidit.eval run` draws images for seeded prompts whose object combinations training
never saw, reads every object back with the programmatic checker and reports accuracy per object,
per prompt, by the object's relative position in the prompt, and on held-out paraphrases.
`python -m lidit.eval report` turns several runs (the demo and its ablations) into a Markdown
table and a bar chart of accuracy by position.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from . import scenes
from .checkpoint import load_checkpoint
from .diffusion import sample
from .instruction import PromptTemplate
from .llm import LLM, encode, load_llm
from .model import LIDiTModel
from .precision import DTYPE_CHOICES, parse_dtype
from .text import TextStates


def encode_prompts(llms: list[LLM], model: LIDiTModel, prompts: list[str]) -> list[TextStates]:
    text = model.config.text
    template = PromptTemplate.of(text)
    return [encode(llm, prompts, template, text.max_tokens, branch.layer) for llm, branch in zip(llms, text.branches)]


def draw(model: LIDiTModel, llms: list[LLM], prompts: list[str], seed: int, steps: int | None = None,
         cfg: float | None = None, batch: int = 50) -> list[torch.Tensor]:
    """Images in [0, 1] (3, H, W); prompt i always gets the noise of seed + i, whatever the batching."""
    config = model.config
    size = config.resolution
    null = encode_prompts(llms, model, [""])
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        cond = encode_prompts(llms, model, chunk)
        uncond = [TextStates.cat([u] * len(chunk)) for u in null]
        noise_seeds = range(seed + start, seed + start + len(chunk))
        x = torch.cat([torch.randn(1, config.dit.in_channels, size, size, generator=torch.Generator().manual_seed(s))
                       for s in noise_seeds])
        out = sample(model, config, cond, uncond, x.shape, steps, cfg, noise=x)
        images.extend(((out.float() + 1) / 2).clamp(0, 1))
    return images


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    dtype = parse_dtype(args.dtype)
    model = load_checkpoint(args.checkpoint, dtype=dtype)
    llms = [load_llm(folder, layer=b.layer, dtype=dtype) for folder, b in zip(args.llm, model.config.text.branches)]
    results: dict = {"label": args.label or Path(args.checkpoint).stem, "checkpoint": str(args.checkpoint),
                     "dtype": str(dtype).removeprefix("torch.")}
    started = time.time()
    for name, styles in (("plain", ("plain",)), ("paraphrase", scenes.HELDOUT_STYLES)):
        examples = scenes.eval_set(args.seed, args.count, styles=styles)
        images = draw(model, llms, [e.prompt for e in examples], args.seed, args.steps, args.cfg)
        results[name] = scenes.score(images, [e.scene for e in examples]).summary()
        if args.samples and name == "plain":
            save_grid(images[:16], [e.prompt for e in examples[:16]], Path(args.samples))
    results["seconds"] = round(time.time() - started, 1)
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


def save_grid(images: list[torch.Tensor], prompts: list[str], path: Path) -> None:
    from PIL import Image
    cols = 4
    size = images[0].shape[-1]
    grid = Image.new("RGB", (cols * size, -(-len(images) // cols) * size))
    for i, img in enumerate(images):
        grid.paste(Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()), ((i % cols) * size, (i // cols) * size))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(path)
    path.with_suffix(".txt").write_text("\n".join(prompts) + "\n")


def pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}%"


def report(args: argparse.Namespace) -> None:
    runs = [json.loads(Path(f).read_text()) for f in args.results]
    rows = ["| variant | objects (1-2 obj) | objects (4 obj) | prompts | first vs last object | paraphrases (objects) |",
            "|---|---|---|---|---|---|"]
    for r in runs:
        plain, by_n = r["plain"], r["plain"]["by_n"]
        one_two = (by_n.get("1", 0) + 2 * by_n.get("2", 0)) / 3  # object-weighted over 1- and 2-object prompts
        rows.append(f"| {r['label']} | {pct(one_two)} | {pct(by_n.get('4', float('nan')))} | {pct(plain['prompt_accuracy'])} "
                    f"| {pct(plain['first_object'])} vs {pct(plain['last_object'])} | {pct(r['paraphrase']['object_accuracy'])} |")
    table = "\n".join(rows)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.chart:
        bar_chart(runs, Path(args.chart))


def bar_chart(runs: list[dict], path: Path) -> None:
    """Accuracy by relative position in the prompt (quarters), one bar per variant."""
    from PIL import Image, ImageDraw
    colours = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188)]
    width, height, left, bottom, top = 720, 360, 50, 60, 20
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    plot_h = height - bottom - top
    for tick in range(0, 101, 20):
        y = top + plot_h * (1 - tick / 100)
        d.line([(left, y), (width - 10, y)], fill=(225, 225, 225))
        d.text((8, y - 6), f"{tick}%", fill="black")
    group_w = (width - left - 10) / len(scenes.POSITION_BUCKETS)
    bar_w = group_w * 0.8 / len(runs)
    for g, bucket in enumerate(scenes.POSITION_BUCKETS):
        x0 = left + g * group_w + group_w * 0.1
        for i, r in enumerate(runs):
            acc = r["plain"]["by_position"][bucket]
            x = x0 + i * bar_w
            d.rectangle([x, top + plot_h * (1 - acc), x + bar_w - 2, top + plot_h], fill=colours[i % len(colours)])
        d.text((x0 + group_w * 0.3, height - bottom + 6), bucket, fill="black")
    for i, r in enumerate(runs):
        x = left + i * 130
        d.rectangle([x, height - 22, x + 10, height - 12], fill=colours[i % len(colours)])
        d.text((x + 14, height - 24), r["label"][:18], fill="black")
    img.save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lidit.eval")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="score one checkpoint on unseen prompts")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--llm", action="append", required=True, help="HF folder per branch, in the checkpoint's order")
    p.add_argument("--count", type=int, default=200, help="prompts per set (plain, paraphrase)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float)
    p.add_argument("--label")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--samples", help="write a grid of the first 16 images here (PNG)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="compute dtype of the LLMs and the model; auto: bf16 where the CPU has it natively, else fp32")
    p.set_defaults(run=run)
    p = sub.add_parser("report", help="table + chart from several result JSONs")
    p.add_argument("results", nargs="+")
    p.add_argument("--markdown")
    p.add_argument("--chart")
    p.set_defaults(run=report)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
