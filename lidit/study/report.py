"""From scored runs to figures with 95% intervals: the tables, the differences from a reference,
the chart of accuracy by position, and where the errors are (by shape, colour or template).

Runs come from `lidit.study.benchmark` (one JSON per checkpoint scored) or from the study's records;
every interval resamples whole prompts and whole training seeds (`lidit.study.stats`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from . import scenes
from .stats import Counts, Interval, cluster_bootstrap, difference, separated


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
