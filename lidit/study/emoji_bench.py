"""The emoji benchmark's command line: `python -m lidit eval emoji ceiling|bench|study|grid`.

`bench` scores one checkpoint's drawings on the benchmark's sets and `study` trains and scores the
variants that test the paper's claim (both in `lidit.study.emoji_study`); `grid` draws the README
picture. `ceiling` measures the scorer (`lidit.study.emoji_scorer`) on real images it did not index, the
ceiling to report beside any model's score. The base emoji are split in two halves by a hash of their
key; the CCA projection is fitted on the (Noto, Twemoji) pairs of half A only, and the queries are
the images of half B:
- `google->twitter`: a Noto image among every Twemoji image (all 3,781 concepts), and the reverse;
- `openmoji->both`: an OpenMoji SVG (a third artist, never indexed, never trained on), rasterised
  at 64 px, among every image of both styles.
Each figure is top-1 and top-5 with a Wilson 95% interval over the queries, and the same for the
base emoji (a right person in the wrong skin tone counts), to show how many misses are tone misses.
"""
from __future__ import annotations

import argparse
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data.emoji import Emoji, caption, load_catalog, stable_fraction
from .emoji_scorer import Scorer, accuracy, rasterise_svg, read_real

OPENMOJI_TGZ = ".cache/emoji/npm/openmoji-17.0.0.tgz"


def halves(emojis: Sequence[Emoji]) -> tuple[set[str], set[str]]:
    """Image keys of half A (fits the projection) and half B (queries), split by base emoji."""
    a = {e.key for e in emojis if stable_fraction("scorer-half", e.base) < 0.5}
    return a, {e.key for e in emojis} - a


def _report(name: str, ranked: list[list[str]], truth: list[str], base_of: dict[str, str]) -> dict:
    exact = accuracy(ranked, truth)
    base = accuracy([[base_of[k] for k in r] for r in ranked], [base_of[t] for t in truth])
    print(f"{name:>18}: {exact}\n{'(base emoji)':>18}: {base}")
    return {"exact": exact.to_dict(), "base_emoji": base.to_dict()}


def openmoji_images(tgz: str | Path, emojis: Sequence[Emoji], size: int = 64) -> dict[str, np.ndarray]:
    """{image key: OpenMoji's colour SVG rasterised on white} for every emoji OpenMoji draws."""
    by_hex = {e.hexcode.replace("-FE0F", ""): e.key for e in emojis}
    out = {}
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar:
            name = Path(member.name)
            if member.isfile() and name.parent.as_posix() == "package/color/svg" and name.suffix == ".svg":
                key = by_hex.get(name.stem.upper().replace("-FE0F", ""))
                if key is not None:
                    out[key] = rasterise_svg(tar.extractfile(member).read(), size)
    return out


def ceiling(root: str | Path, openmoji: str | Path | None = OPENMOJI_TGZ, limit: int | None = None) -> dict:
    emojis, _ = load_catalog(root)
    base_of = {e.key: e.base for e in emojis}
    a, b = halves(emojis)
    both = [e.key for e in emojis if len(e.styles) == 2]
    queries = [k for k in both if k in b][:limit]
    result: dict = {"halves": {"fit": len(a), "query": len(b)}}
    for query_style, index_style in (("google", "twitter"), ("twitter", "google")):
        scorer = Scorer.from_folder(root, styles=(index_style,), fit_keys=[k for k in both if k in a])
        ranked = scorer.rank(read_real(root, query_style, queries))
        result[f"{query_style}->{index_style}"] = _report(f"{query_style}->{index_style}", ranked, queries, base_of)
    if openmoji:
        drawn = openmoji_images(openmoji, [e for e in emojis if e.key in b])
        keys = sorted(drawn)[:limit]
        scorer = Scorer.from_folder(root, fit_keys=[k for k in both if k in a])
        ranked = scorer.rank([drawn[k] for k in keys])
        result["openmoji->both"] = _report("openmoji->both", ranked, keys, base_of)
    result["index_size"] = {"concepts": len(emojis)}
    return result


#: the README grid: (key, trained label, a phrasing of it that no caption holds), all drawn in one style
GRID = [("1f422", "turtle", "tortoise"), ("1f355", "pizza", "pepperoni"), ("1f47b", "ghost", "fantôme"),
        ("1f34c", "banana", "plátano"), ("1f30b", "volcano", "eruption"), ("1f438", "frog", "grenouille")]


def grid(checkpoint: str | Path, llm_folders: Sequence[str], out: str | Path, data: str | Path = "data/emoji",
         style: str = "twitter", seed: int = 0, cell: int = 96) -> list[str]:
    """A picture per row: the real emoji, then the model's drawing of its trained label and of a
    phrasing never trained on (checked against set (b)), each over its prompt. Returns the prompts."""
    from PIL import Image, ImageDraw, ImageFont

    from ..checkpoint import load_checkpoint
    from ..llm import load_llm
    from .benchmark import draw

    emojis, catalog = load_catalog(data)
    held_out = {(p["key"], p["text"]) for p in catalog["phrasings"]}
    labels = {e.key: e.label for e in emojis}
    for key, label, phrasing in GRID:
        if labels.get(key) != label or (key, phrasing) not in held_out:
            raise ValueError(f"{label!r} / {phrasing!r} is not a trained label and a held-out phrasing of {key}")
    model = load_checkpoint(checkpoint)
    llms = [load_llm(folder, layer=b.layer) for folder, b in zip(llm_folders, model.config.text.branches)]
    prompts = [caption(text, style) for _, label, phrasing in GRID for text in (label, phrasing)]
    images = draw(model, llms, prompts, seed)
    sheet = Image.new("RGB", (3 * cell, len(GRID) * (cell + 16)), "white")
    pen = ImageDraw.Draw(sheet)
    try:  # a font with accents (fantôme, plátano); Pillow's own lacks them
        font = ImageFont.truetype("DejaVuSans.ttf", 11)
    except OSError:
        font = ImageFont.load_default(size=11)
    for row, (key, _, _) in enumerate(GRID):
        y = row * (cell + 16)
        real = Image.open(Path(data) / "real" / style / f"{key}.png").convert("RGB").resize((cell, cell))
        drawn = [Image.fromarray((images[2 * row + i].permute(1, 2, 0) * 255).round().byte().numpy())
                 .resize((cell, cell), Image.NEAREST) for i in (0, 1)]
        for col, (picture, text) in enumerate(zip([real, *drawn], ["real", *prompts[2 * row:2 * row + 2]])):
            sheet.paste(picture, (col * cell, y))
            pen.text((col * cell + 2, y + cell + 2), text.split(",")[0][:18], fill="black", font=font)
    sheet.save(out)
    return prompts


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lidit eval emoji", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ceiling", help="the scorer's accuracy on real images it did not index")
    p.add_argument("--data", default="data/emoji", help="a folder made by scripts/provision_emoji.py")
    p.add_argument("--openmoji", default=OPENMOJI_TGZ, help="the openmoji npm tarball; '' to skip")
    p.add_argument("--limit", type=int, help="at most this many queries per figure")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    p = sub.add_parser("grid", help="the README picture: real emoji, and drawings of trained and unseen phrasings")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--llm", action="append", required=True, help="HF folder per branch, in the checkpoint's order")
    p.add_argument("--data", default="data/emoji")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("bench", help="sets (a), (b), (c1), (c2) drawn by one checkpoint, top-1 and top-5")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--llm", action="append", required=True, help="HF folder per branch, in the checkpoint's order")
    p.add_argument("--data", default="data/emoji")
    p.add_argument("--count", type=int, default=500, help="prompts per set at most (a seeded sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write bench.json and table.md here")
    p = sub.add_parser("study", help="train both-LLM, one-LLM and random-LLM variants at one budget and score them")
    p.add_argument("--out", default="out/emoji-study", help="data, models, runs and the table go here")
    p.add_argument("--limit", type=int, default=150, help="base emoji in the study's subset (with their skin tones)")
    p.add_argument("--steps", type=int, default=2500, help="training steps of every variant (batch 32)")
    p.add_argument("--models", default="models/LLM", help="folder holding the two demo LLMs")
    p.add_argument("--count", type=int, help="prompts per set at most (default: all of them)")
    p.add_argument("--jobs", type=int, default=2, help="variants trained at once, one thread each")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command in ("bench", "study"):
        from . import emoji_study

        return getattr(emoji_study, args.command)(args)
    if args.command == "grid":
        return {"prompts": grid(args.checkpoint, args.llm, args.out, args.data, seed=args.seed)}
    result = ceiling(args.data, args.openmoji or None, args.limit)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result
