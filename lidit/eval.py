"""The prompt-following benchmark: the paper's Fig. 3 at small scale, on the synthetic scenes.

`python -m lidit.eval run` draws images for seeded prompts whose object combinations training
never saw, reads every object back with the programmatic checker and reports accuracy per object,
per prompt, by the object's relative position in the prompt, and on held-out paraphrases; its JSON
keeps every object's result, because the intervals resample whole prompts. `python -m lidit.eval
report` turns runs (several seeds of several variants) into a Markdown table and a bar chart of
accuracy by position, every figure with its 95% interval (`lidit.stats`). `python -m lidit.eval
breakdown` says which objects fail: by the asked shape, colour, or the prompt's template.
`python -m lidit.bench` runs the whole study.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import scenes
from .checkpoint import load_checkpoint
from .diffusion import sample
from .instruction import PromptTemplate
from .llm import LLM, encode, load_llm
from .model import LIDiTModel
from .precision import DTYPE_CHOICES, parse_dtype
from .stats import Counts, Interval, cluster_bootstrap, difference, separated
from .text import TextStates


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
    dtype = parse_dtype(args.dtype)
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


# ------------------------------------------------------------------------------------------------
# from runs to figures with intervals
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """One figure: which objects of which prompt set count; `whole_prompt`: a prompt is one unit,
    right only when all its objects are."""

    prompt_set: str
    select: Callable[[int, int], bool]  # (objects in the prompt, 0-based index) -> counted?
    whole_prompt: bool = False


def _quarter(prompt_set: str, bucket: int) -> Metric:
    return Metric(prompt_set, lambda n, k: n >= 2 and scenes.position_bucket(k, n) == bucket)


#: every figure of the table and the chart. Position quarters skip 1-object prompts, whose single
#: object would otherwise fill the last quarter with the easiest case.
METRICS: dict[str, Metric] = {
    "objects 1-2": Metric("plain", lambda n, k: n <= 2),
    "objects 4": Metric("plain", lambda n, k: n == 4),
    "prompts": Metric("plain", lambda n, k: True, whole_prompt=True),
    "first": Metric("plain", lambda n, k: n >= 2 and k == 0),
    "last": Metric("plain", lambda n, k: n >= 2 and k == n - 1),
    "paraphrases": Metric("paraphrase", lambda n, k: True),
    "paraphrase first": Metric("paraphrase", lambda n, k: n >= 2 and k == 0),
    "paraphrase last": Metric("paraphrase", lambda n, k: n >= 2 and k == n - 1),
    **{f"position {b}": _quarter("plain", i) for i, b in enumerate(scenes.POSITION_BUCKETS)},
    **{f"paraphrase position {b}": _quarter("paraphrase", i) for i, b in enumerate(scenes.POSITION_BUCKETS)},
    "6 obj": Metric("long", lambda n, k: True),
    "6 obj first": Metric("long", lambda n, k: k == 0),
    "6 obj last": Metric("long", lambda n, k: k == n - 1),
    **{f"6 obj position {b}": _quarter("long", i) for i, b in enumerate(scenes.POSITION_BUCKETS)},
}
#: the positional bias as one number: first minus last object on the same prompts, resampled together
GAPS: dict[str, tuple[str, str]] = {"first - last": ("first", "last"),
                                    "paraphrase first - last": ("paraphrase first", "paraphrase last"),
                                    "6 obj first - last": ("6 obj first", "6 obj last")}
TABLE = {"objects 1-2": "objects (1-2 obj)", "objects 4": "objects (4 obj)", "prompts": "prompts",
         "first": "first object", "last": "last object", "first - last": "first - last",
         "paraphrases": "paraphrases (objects)", "paraphrase first - last": "paraphrases: first - last",
         "6 obj first": "6 obj: first object",
         "6 obj last": "6 obj: last object", "6 obj first - last": "6 obj: first - last"}


def prompt_counts(rows: list[list[int]], metric: Metric) -> tuple[list[int], list[int]]:
    """Per prompt: (right, counted) objects of the metric's kind."""
    right, counted = [], []
    for row in rows:
        keep = [v for k, v in enumerate(row) if metric.select(len(row), k)]
        right.append(int(bool(keep) and all(keep)) if metric.whole_prompt else sum(keep))
        counted.append(int(bool(keep)) if metric.whole_prompt else len(keep))
    return right, counted


def metric_counts(runs: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per metric, (seeds, prompts) arrays of right and counted objects over the runs that scored
    its prompt set. The runs must share the prompts (same eval seed and count): seeds and prompts
    are crossed."""
    counts = {}
    for name, metric in METRICS.items():
        rows = [r[metric.prompt_set]["object_correct"] for r in runs if metric.prompt_set in r]
        if not rows:
            continue
        if len({len(x) for x in rows}) != 1:
            raise ValueError(f"runs scored {sorted({len(x) for x in rows})} prompts of set {metric.prompt_set!r}: "
                             "pool only runs scored on the same prompts")
        right, counted = (np.array(a) for a in zip(*(prompt_counts(x, metric) for x in rows)))
        if counted.sum():
            counts[name] = right, counted
    return counts


def run_values(result: dict) -> dict[str, float]:
    """Every metric's value in one run (one seed): the per-seed numbers behind a pooled interval."""
    ratios = {name: right.sum() / counted.sum() for name, (right, counted) in metric_counts([result]).items()}
    return {**ratios, **{name: ratios[a] - ratios[b] for name, (a, b) in GAPS.items() if a in ratios and b in ratios}}


def figure_counts(runs: list[dict]) -> dict[str, list[Counts]]:
    """Every metric and gap as the counts its interval comes from: one pair, or two for a gap."""
    counts = metric_counts(runs)
    return {**{name: [pair] for name, pair in counts.items()},
            **{name: [counts[a], counts[b]] for name, (a, b) in GAPS.items() if a in counts and b in counts}}


def variant_metrics(runs: list[dict]) -> dict[str, Interval]:
    """Every metric and gap over the runs (training seeds) of one variant, with its 95% interval."""
    return {name: cluster_bootstrap(*fig[0], minus=fig[1] if len(fig) == 2 else None)
            for name, fig in figure_counts(runs).items()}


def variant_differences(runs: list[dict], reference: list[dict]) -> dict[str, Interval]:
    """Every metric and gap of `runs` minus the reference's, paired by prompt, with its 95% interval."""
    mine, ref = figure_counts(runs), figure_counts(reference)
    return {name: difference(fig, ref[name]) for name, fig in mine.items() if name in ref}


def pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}%"


def cell(interval: Interval | None) -> str:
    return "-" if interval is None else f"{pct(interval.value)} [{100 * interval.lo:.1f}, {100 * interval.hi:.1f}]"


def points(interval: Interval) -> str:
    """A difference in percentage points with its interval; bold when the interval excludes 0."""
    text = f"{100 * interval.value:+.1f} [{100 * interval.lo:+.1f}, {100 * interval.hi:+.1f}]"
    return f"**{text}**" if excludes_zero(interval) else text


def excludes_zero(interval: Interval) -> bool:
    return interval.lo > 0 or interval.hi < 0


def _columns(variants: dict[str, dict[str, Interval]]) -> list[str]:
    return [m for m in TABLE if any(m in v for v in variants.values())]


def markdown_table(variants: dict[str, dict[str, Interval]], seeds: dict[str, int]) -> str:
    """One row per variant; every cell 'value [95% interval]'. Long-set columns only when scored."""
    columns = _columns(variants)
    rows = ["| variant | seeds | " + " | ".join(TABLE[m] for m in columns) + " |",
            "|---|---|" + "---|" * len(columns)]
    for label, metrics in variants.items():
        rows.append(f"| {label} | {seeds[label]} | " + " | ".join(cell(metrics.get(m)) for m in columns) + " |")
    return "\n".join(rows)


def difference_table(diffs: dict[str, dict[str, Interval]], reference: str) -> str:
    """One row per variant: each of the table's figures minus the reference's, in points."""
    columns = _columns(diffs)
    rows = [f"| minus {reference} | " + " | ".join(TABLE[m] for m in columns) + " |", "|---|" + "---|" * len(columns)]
    for label, metrics in diffs.items():
        rows.append(f"| {label} | " + " | ".join(points(metrics[m]) if m in metrics else "-" for m in columns) + " |")
    return "\n".join(rows)


def called_differences(diffs: dict[str, dict[str, Interval]], variants: dict[str, dict[str, Interval]],
                       reference: str) -> tuple[list[str], int]:
    """The table's figures whose difference from the reference excludes 0: the differences the
    benchmark reports; and how many were tested, since about 1 in 20 excludes 0 by chance alone."""
    out, tested = [], 0
    for label, metrics in diffs.items():
        for name in _columns(diffs):
            if name not in metrics:
                continue
            tested += 1
            if excludes_zero(d := metrics[name]):
                mine, ref = variants[label][name], variants[reference][name]
                apart = "; the two intervals are apart too" if separated(mine, ref) else ""
                out.append(f"{label}: {name} {points(d).strip('*')} points ({cell(mine)} vs {cell(ref)}{apart})")
    return out, tested


def report(args: argparse.Namespace) -> None:
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


# ------------------------------------------------------------------------------------------------
# where the errors are: by the asked shape, colour, or the prompt's template
# ------------------------------------------------------------------------------------------------
#: (example, object index) -> its group
GROUPINGS: dict[str, Callable[[scenes.Example, int], str]] = {
    "shape": lambda e, k: e.scene.objects[k].shape,
    "colour": lambda e, k: e.scene.objects[k].colour,
    "template": lambda e, k: f"{e.style} ({e.scene.n} obj)",
}


def breakdown(runs: list[dict], prompt_set: str, by: str) -> dict[str, tuple[int, Interval]]:
    """Per group: (objects counted, objects right with its 95% interval), over runs scored on the same
    prompts (seeds x prompts, cluster bootstrap). The prompts are rebuilt from the scoring seed and
    count, so that a record, which keeps only each object's 0/1, says which objects failed."""
    settings = [run.get("settings", run) for run in runs]
    if len({(s["seed"], s["count"]) for s in settings}) != 1:
        raise ValueError("runs scored on other prompts (eval seed or count) cannot be pooled")
    examples = scenes.PROMPT_SETS[prompt_set].examples(settings[0]["seed"], settings[0]["count"])
    rows = [run[prompt_set]["object_correct"] for run in runs]
    key = GROUPINGS[by]
    groups = [[key(e, k) for k in range(e.scene.n)] for e in examples]
    out = {}
    for group in sorted({g for row in groups for g in row}):
        counted = np.array([[row.count(group) for row in groups]] * len(runs))
        right = np.array([[sum(v for v, g in zip(correct, row) if g == group) for correct, row in zip(seed, groups)]
                          for seed in rows])
        out[group] = int(counted.sum()), cluster_bootstrap(right, counted)
    return out


def show_breakdown(args: argparse.Namespace) -> None:
    runs = [json.loads(Path(f).read_text()) for f in args.results]
    runs = [run.get("score", run) for run in runs]  # a bench record keeps the scores under "score"
    print(f"| {args.by} | objects | right [95% interval] |\n|---|---|---|")
    for group, (counted, interval) in breakdown(runs, args.set, args.by).items():
        print(f"| {group} | {counted} | {cell(interval)} |")


_COLOURS = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188), (0, 172, 193),
            (255, 112, 67), (120, 144, 156)]


def _chart_y(value: float, y_top: float, height: float, floor: int) -> float:
    """Pixel row of an accuracy (0..1) on a panel whose axis runs from `floor` percent to 100."""
    return y_top + height * (1 - (100 * value - floor) / (100 - floor))


def position_chart(variants: dict[str, dict[str, Interval]], path: Path) -> None:
    """Accuracy by relative position in the prompt (quarters): one marker per variant with its 95%
    interval as a whisker; one panel per prompt set that any variant was scored on.

    Markers, not bars: every variant sits near the ceiling, so each panel's axis starts at the 10%
    below its lowest interval (printed on the axis), where a bar's length would mean nothing.
    """
    from PIL import Image, ImageDraw
    panels = [(prefix, title) for prefix, title in (
        ("position", "Objects right by relative position in the prompt, 95% intervals: plain prompts of 2-4 objects"),
        ("paraphrase position", "The same on the held-out paraphrases"),
        ("6 obj position", "The same on 6-object prompts (models trained on 1-6 objects, 1.5x canvas)"))
              if any(f"{prefix} {scenes.POSITION_BUCKETS[0]}" in v for v in variants.values())]
    width, panel_h, left, top, legend_h = 900, 260, 50, 24, 22 * -(-len(variants) // 4) + 10
    img = Image.new("RGB", (width, panel_h * len(panels) + legend_h), "white")
    d = ImageDraw.Draw(img)
    group_w = (width - left - 10) / len(scenes.POSITION_BUCKETS)
    slot = group_w * 0.8 / max(1, len(variants))
    for p, (prefix, title) in enumerate(panels):
        shown = [iv for v in variants.values() for b in scenes.POSITION_BUCKETS
                 if (iv := v.get(f"{prefix} {b}")) is not None and not math.isnan(iv.lo)]
        floor = max(0, math.floor(min((iv.lo for iv in shown), default=0) * 10) - 1) * 10  # percent
        step = 5 if floor >= 60 else 10
        y_top = p * panel_h + top
        level = partial(_chart_y, y_top=y_top, height=panel_h - top - 30, floor=floor)
        d.text((left, y_top - 18), title, fill="black")
        for tick in range(floor, 101, step):
            d.line([(left, level(tick / 100)), (width - 10, level(tick / 100))], fill=(225, 225, 225))
            d.text((8, level(tick / 100) - 6), f"{tick}%", fill="black")
        for g, bucket in enumerate(scenes.POSITION_BUCKETS):
            x0 = left + g * group_w + group_w * 0.1
            for i, metrics in enumerate(variants.values()):
                iv = metrics.get(f"{prefix} {bucket}")
                if iv is None or math.isnan(iv.value):
                    continue
                mid = x0 + (i + 0.5) * slot
                d.line([(mid, level(iv.lo)), (mid, level(iv.hi))], fill="black", width=2)
                for v in (iv.lo, iv.hi):
                    d.line([(mid - 3, level(v)), (mid + 3, level(v))], fill="black")
                y = level(iv.value)
                d.ellipse([mid - 5, y - 5, mid + 5, y + 5], fill=_COLOURS[i % len(_COLOURS)], outline="black")
            d.text((x0 + group_w * 0.3, level(floor / 100) + 6), bucket, fill="black")
    for i, label in enumerate(variants):
        x, y = left + (i % 4) * 210, panel_h * len(panels) + 6 + 22 * (i // 4)
        d.ellipse([x, y, x + 10, y + 10], fill=_COLOURS[i % len(_COLOURS)], outline="black")
        d.text((x + 14, y - 1), label[:34], fill="black")
    img.save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lidit.eval")
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
    p.set_defaults(run=report)
    p = sub.add_parser("breakdown", help="objects right by asked shape, colour or template, with 95%% intervals, "
                       "from result JSONs or bench records (several: the seeds of one variant)")
    p.add_argument("results", nargs="+")
    p.add_argument("--set", default="paraphrase", choices=sorted(scenes.PROMPT_SETS))
    p.add_argument("--by", default="template", choices=sorted(GROUPINGS))
    p.set_defaults(run=show_breakdown)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
