"""The prompt-following benchmark: the paper's Fig. 3 at small scale, on the synthetic scenes.

`python -m lidit eval run` draws images for seeded prompts whose object combinations training
never saw, reads every object back with the programmatic checker and reports accuracy per object,
per prompt, by the object's relative position in the prompt, and on held-out paraphrases; its JSON
keeps every object's result, because the intervals resample whole prompts. `python -m lidit eval
report` turns runs (several seeds of several variants) into a Markdown table and a bar chart of
accuracy by position, every figure with its 95% interval (`lidit.study.report`). `python -m lidit
eval breakdown` says which objects fail: by the asked shape, colour, or the prompt's template.
`python -m lidit study` runs the whole ablation study.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint
from ..diffusion import sample
from ..instruction import PromptTemplate
from ..llm import LLM, encode, load_llm
from ..model import LIDiTModel
from ..precision import DTYPE_CHOICES, resolve_dtype
from ..states import TextStates
from . import scenes
from .report import GROUPINGS, breakdown, cell, markdown_table, position_chart, variant_metrics


def encode_prompts(llms: list[LLM], model: LIDiTModel, prompts: list[str],
                   memo: dict | None = None) -> list[TextStates]:
    """Each branch's LLM states of `prompts`. A `memo` (one per set of loaded LLMs) keeps them for the
    next model that reads the same LLM layer with the same template: the benchmark scores dozens of
    models on one prompt set, and re-encoding it would cost about as much as sampling."""
    text = model.config.text
    template = PromptTemplate.of(text)
    out = []
    for llm, branch in zip(llms, text.branches):
        key = (llm.name, branch.layer, template, text.max_tokens, tuple(prompts))
        states = memo.get(key) if memo is not None else None
        if states is None:
            states = encode(llm, prompts, template, text.max_tokens, branch.layer)
            if memo is not None:
                memo[key] = states
        out.append(states)
    return out


def draw(model: LIDiTModel, llms: list[LLM], prompts: list[str], seed: int, steps: int | None = None,
         cfg: float | None = None, batch: int = 50, memo: dict | None = None) -> list[torch.Tensor]:
    """Images in [0, 1] (3, H, W); prompt i always gets the noise of seed + i, whatever the batching."""
    config = model.config
    size = config.resolution
    null = encode_prompts(llms, model, [""], memo)
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        cond = encode_prompts(llms, model, chunk, memo)
        uncond = [TextStates.cat([u] * len(chunk)) for u in null]
        noise_seeds = range(seed + start, seed + start + len(chunk))
        x = torch.cat([torch.randn(1, config.dit.in_channels, size, size, generator=torch.Generator().manual_seed(s))
                       for s in noise_seeds])
        out = sample(model, config, cond, uncond, x.shape, steps, cfg, noise=x)
        images.extend(((out.float() + 1) / 2).clamp(0, 1))
    return images


def score_model(model: LIDiTModel, llms: list[LLM], sets: list[str], count: int, seed: int = 1234,
                steps: int | None = None, cfg: float | None = None, samples: Path | None = None,
                memo: dict | None = None) -> dict:
    """Per prompt set: the summary, plus every object's 0/1 per prompt, which the intervals resample."""
    results: dict = {}
    for name in sets:
        examples = scenes.PROMPT_SETS[name].examples(seed, count)
        images = draw(model, llms, [e.prompt for e in examples], seed, steps, cfg, memo=memo)
        result = scenes.score(images, [e.scene for e in examples])
        results[name] = {**result.summary(), "object_correct": [[int(v) for v in row] for row in result.object_correct]}
        if samples and name == sets[0]:
            save_grid(images[:16], [e.prompt for e in examples[:16]], samples)
    return results


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    dtype = resolve_dtype(args.dtype)
    model = load_checkpoint(args.checkpoint, dtype=dtype)
    llms = [load_llm(folder, layer=b.layer, dtype=dtype) for folder, b in zip(args.llm, model.config.text.branches)]
    started = time.time()
    results = {"label": args.label or Path(args.checkpoint).stem, "checkpoint": str(args.checkpoint),
               "dtype": str(dtype).removeprefix("torch."), "count": args.count, "seed": args.seed,
               **score_model(model, llms, args.sets.split(","), args.count, args.seed, args.steps, args.cfg,
                             Path(args.samples) if args.samples else None)}
    results["seconds"] = round(time.time() - started, 1)
    print(json.dumps({k: {m: x for m, x in v.items() if m != "object_correct"} if k in scenes.PROMPT_SETS else v
                      for k, v in results.items()}, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results))
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


def show_report(args: argparse.Namespace) -> None:
    """Runs with the same label are the seeds of one variant."""
    grouped: dict[str, list[dict]] = {}
    for f in args.results:
        run = json.loads(Path(f).read_text())
        grouped.setdefault(run["label"], []).append(run)
    variants = {label: variant_metrics(runs) for label, runs in grouped.items()}
    table = markdown_table(variants, {label: len(runs) for label, runs in grouped.items()})
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.chart:
        position_chart(variants, Path(args.chart))


def show_breakdown(args: argparse.Namespace) -> None:
    runs = [json.loads(Path(f).read_text()) for f in args.results]
    runs = [run.get("score", run) for run in runs]  # a study record keeps the scores under "score"
    print(f"| {args.by} | objects | right [95% interval] |\n|---|---|---|")
    for group, (counted, interval) in breakdown(runs, args.set, args.by).items():
        print(f"| {group} | {counted} | {cell(interval)} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lidit eval")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="score one checkpoint on unseen prompts")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--llm", action="append", required=True, help="HF folder per branch, in the checkpoint's order")
    p.add_argument("--count", type=int, default=400, help="prompts per set")
    p.add_argument("--sets", default="plain,paraphrase",
                   help=f"comma-separated prompt sets of {sorted(scenes.PROMPT_SETS)}")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float)
    p.add_argument("--label")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--samples", help="write a grid of the first 16 images here (PNG)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="compute dtype of the LLMs and the model; auto: bf16 where the CPU has it natively, else fp32")
    p.set_defaults(run=run)
    p = sub.add_parser("report", help="table + chart with 95%% intervals from result JSONs "
                       "(runs with one label are the seeds of one variant)")
    p.add_argument("results", nargs="+")
    p.add_argument("--markdown")
    p.add_argument("--chart")
    p.set_defaults(run=show_report)
    p = sub.add_parser("breakdown", help="objects right by asked shape, colour or template, with 95%% intervals, "
                       "from result JSONs or bench records (several: the seeds of one variant)")
    p.add_argument("results", nargs="+")
    p.add_argument("--set", default="paraphrase", choices=sorted(scenes.PROMPT_SETS))
    p.add_argument("--by", default="template", choices=sorted(GROUPINGS))
    p.set_defaults(run=show_breakdown)
    args = parser.parse_args(argv)
    args.run(args)

