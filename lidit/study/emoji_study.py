"""The emoji benchmark on generated images, and the variant study that tests the paper's claim with it.

`score_checkpoint` draws every prompt of the benchmark's sets with a checkpoint and asks the retrieval
scorer (`lidit.study.emoji_scorer`) which emoji each drawing shows, among the real images of the
style the prompt asks for:
- (a) trained (label, style) captions;
- (b) phrasings no caption holds (tags, CLDR keywords and names, OpenMoji tags), in a trained style;
  a phrasing names a base emoji, so a drawing of it in any skin tone counts;
- (c1) a person in the skin tone that training never paired with them;
- (c2) a concept in the Twemoji style that training only saw drawn by Noto.

`study` trains three variants at one budget (same data, steps, batch, schedule and seed) and scores
them on the same prompts. The difference between them is what the text pathway starts from:
- `both`: the two demo LLMs (SmolLM2-135M-Instruct and Gemma-3-270M), as the emoji checkpoint;
- `smollm2`: SmolLM2 alone;
- `control`: SmolLM2's architecture and tokenizer with freshly initialised weights (seeded), frozen
  like the real one. The same tokens reach the same refiners, which are trained from scratch in
  every variant; only the pretrained language knowledge is gone.
The claim holds where an LLM variant beats the control on set (b) with an interval of the
difference (paired by prompt) that excludes 0. The study trains on a subset of the emoji
(`--limit` base emoji with their skin tones, the same hash-chosen held-out splits) so that a CPU
can train each variant to fit its training set within minutes.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import preset
from ..data.emoji import Emoji, caption, load_catalog
from .emoji_scorer import Scorer
from .stats import Interval, difference, wilson

REPO = Path(__file__).resolve().parents[2]
BASE_CONFIG = REPO / "configs" / "emoji.json"
SETS = ("a", "b", "c1", "c2")
SET_NAMES = {"a": "(a) trained captions", "b": "(b) unseen phrasings", "c1": "(c1) unseen person x tone",
             "c2": "(c2) unseen concept x style"}
SMOLLM2, GEMMA = "SmolLM2-135M-Instruct", "gemma-3-270m"
CONTROL = "SmolLM2-135M-random"


@dataclass(frozen=True)
class Query:
    """One prompt of a set and the emoji that answers it."""

    prompt: str
    style: str
    truth: str
    any_tone: bool  # count a drawing of the same base emoji in another skin tone as right


def prompt_sets(root: str | Path, count: int | None = None, seed: int = 0) -> dict[str, list[Query]]:
    """The benchmark's queries, each set capped at `count` by a seeded sample (None: all of them)."""
    emojis, catalog = load_catalog(root)
    by_key: dict[str, Emoji] = {e.key: e for e in emojis}
    trained = [(e, s) for e in emojis for s in e.styles if s not in e.heldout]
    sets = {
        "a": [Query(e.caption(s), s, e.key, False) for e, s in trained],
        "c1": [Query(e.caption(s), s, e.key, False) for e in emojis for s, why in e.heldout.items() if why == "tone"],
        "c2": [Query(e.caption(s), s, e.key, False) for e in emojis for s, why in e.heldout.items() if why == "style"],
    }
    styles = sorted({s for e in emojis for s in e.styles})
    sets["b"] = [Query(caption(p["text"], styles[i % len(styles)]), styles[i % len(styles)], p["key"], True)
                 for i, p in enumerate(catalog["phrasings"]) if p["key"] in by_key]
    rng = random.Random(seed)
    return {name: (rng.sample(sets[name], count) if count and len(sets[name]) > count else sets[name])
            for name in SETS}


def hits(scorers: dict[str, Scorer], base_of: dict[str, str], queries: Sequence[Query],
         images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """0/1 per query: the truth is the scorer's first answer, and among its first five."""
    top1, top5 = np.zeros(len(queries), np.int64), np.zeros(len(queries), np.int64)
    for style, scorer in scorers.items():
        rows = [i for i, q in enumerate(queries) if q.style == style]
        if not rows:
            continue
        for i, ranked in zip(rows, scorer.rank([images[i] for i in rows], k=25)):
            q = queries[i]
            if q.any_tone:
                ranked = list(dict.fromkeys(base_of[k] for k in ranked))
                truth = base_of[q.truth]
            else:
                truth = q.truth
            top1[i], top5[i] = ranked[:1] == [truth], truth in ranked[:5]
    return top1, top5


def score_checkpoint(checkpoint: str | Path, llm_folders: Sequence[str | Path], root: str | Path,
                     count: int | None = None, seed: int = 0) -> dict:
    """Per set: n, top-1 and top-5 with Wilson 95% intervals, and the 0/1 hits the differences pair."""
    from ..checkpoint import load_checkpoint
    from ..llm import load_llm
    from .benchmark import draw

    model = load_checkpoint(checkpoint)
    llms = [load_llm(str(folder), layer=b.layer) for folder, b in zip(llm_folders, model.config.text.branches)]
    emojis, _ = load_catalog(root)
    base_of = {e.key: e.base for e in emojis}
    styles = sorted({s for e in emojis for s in e.styles})
    scorers = {s: Scorer.from_folder(root, styles=(s,)) for s in styles}
    memo: dict = {}
    out = {}
    for name, queries in prompt_sets(root, count, seed).items():
        drawn = draw(model, llms, [q.prompt for q in queries], seed, memo=memo)
        images = [(im.permute(1, 2, 0) * 255).round().byte().numpy() for im in drawn]
        top1, top5 = hits(scorers, base_of, queries, images)
        out[name] = {"n": len(queries), "top1": wilson(int(top1.sum()), len(queries)).to_dict(),
                     "top5": wilson(int(top5.sum()), len(queries)).to_dict(),
                     "hits1": top1.tolist(), "hits5": top5.tolist()}
        print(f"{Path(checkpoint).name} {SET_NAMES[name]}: top-1 {top1.mean():.1%}, top-5 {top5.mean():.1%}, "
              f"n = {len(queries)}", flush=True)
    return out


# ---- the variant study -------------------------------------------------------------------------

def random_llm(source: Path, dest: Path, seed: int = 0) -> Path:
    """`source`'s architecture and tokenizer with freshly initialised weights: the no-knowledge control."""
    if (dest / "model.safetensors").is_file():
        return dest
    from transformers import AutoConfig, AutoModelForCausalLM

    dest.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and f.suffix in (".json", ".jinja", ".txt") and f.name != "provenance.json":
            shutil.copy2(f, dest / f.name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    model.save_pretrained(dest, safe_serialization=True)
    (dest / "provenance.json").write_text(json.dumps({"architecture_of": source.name, "weights": "random",
                                                      "seed": seed}, indent=1))
    return dest


def variants(models: Path, control: Path) -> dict[str, dict]:
    """Variant -> (its LLM branches, its `llms` mapping) for `python -m lidit train`."""
    smollm2 = next(b for b in preset("demo").text.branches if b.name == SMOLLM2)

    def one(name: str, folder: Path) -> dict:
        branch = {**asdict(smollm2), "name": name}  # the control has SmolLM2's architecture: its branch too
        return {"branches": [branch], "llms": {name: str(folder)},
                "collab_depth": 0}  # one branch: the collaborative refiner has nothing to attend to

    return {"both": {"llms": {SMOLLM2: str(models / SMOLLM2), GEMMA: str(models / GEMMA)}},
            "smollm2": one(SMOLLM2, models / SMOLLM2), "control": one(CONTROL, control)}


def train_command(variant: dict, shards: Path, out: Path, steps: int, seed: int) -> list[str]:
    overrides = [f"steps={steps}", f"seed={seed}", "threads=1", "progress=plain", "max_minutes=null",
                 f"checkpoint_every={steps}", "log_every=100", f"output_dir={json.dumps(str(out))}",
                 f"data.source={json.dumps('shards:' + str(shards))}", f"llms={json.dumps(variant['llms'])}"]
    if "branches" in variant:
        overrides += [f"model.overrides.text.branches={json.dumps(variant['branches'])}",
                      f"model.overrides.text.collab_depth={variant['collab_depth']}"]
    return [sys.executable, "-m", "lidit", "train", "--config", str(BASE_CONFIG), *overrides]


def prepare(out: Path, limit: int) -> Path:
    """The subset's image folder and its 32 px shards, through the commands users run."""
    data = out / "data"
    subprocess.run([sys.executable, str(REPO / "scripts" / "provision_emoji.py"), "--limit", str(limit),
                    "--out", str(data)], check=True)
    shards = data / "shards-32"
    if not (shards / "index.json").is_file():
        subprocess.run([sys.executable, "-m", "lidit", "convert", "shards", str(data / "train"), str(shards),
                        "--resolution", "32", "--step", "8"], check=True)
    return shards


def train_all(runs: dict[str, list[str]], out: Path, steps: int, jobs: int) -> None:
    """Train every run whose folder lacks its model at `steps`, `jobs` at a time (one thread each)."""
    from .ablation import trained_steps

    pending = [(n, cmd) for n, cmd in runs.items() if trained_steps(out / n / "model.safetensors") != steps]
    running: dict[str, subprocess.Popen] = {}
    while pending or running:
        while pending and len(running) < jobs:
            name, cmd = pending.pop(0)
            (out / name).mkdir(parents=True, exist_ok=True)
            print(f"study: training {name} ({steps} steps), log in {out / name / 'train.log'}", flush=True)
            with open(out / name / "train.log", "w") as log:
                running[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        time.sleep(2)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                if proc.returncode:
                    raise SystemExit(f"training {name} failed (exit {proc.returncode}): see {out / name / 'train.log'}")


def percent(i: dict) -> str:
    return f"{i['value']:.1%} [{i['lo']:.1%}, {i['hi']:.1%}]"


def table(scores: dict[str, dict]) -> str:
    """Markdown: a row per variant and set, top-1 and top-5 with their Wilson 95% intervals."""
    lines = ["| variant | set | n | top-1 | top-5 |", "|---|---|---|---|---|"]
    for variant, by_set in scores.items():
        for name in SETS:
            s = by_set[name]
            lines.append(f"| {variant} | {SET_NAMES[name]} | {s['n']} | {percent(s['top1'])} | {percent(s['top5'])} |")
    return "\n".join(lines)


CEILINGS = {"google->twitter": "a Noto image among the Twemoji images",
            "twitter->google": "a Twemoji image among the Noto images", "openmoji->both": "an OpenMoji drawing among both styles"}


def ceiling_table(result: dict) -> str:
    """Markdown: the scorer on real images it did not index (`emoji_bench.ceiling`), the ceiling beside the table."""
    lines = ["| scorer ceiling: query | n | top-1 | top-5 |", "|---|---|---|---|"]
    for name, words in CEILINGS.items():
        if name in result:
            s = result[name]["exact"]
            lines.append(f"| {words} | {s['n']} | {percent(s['top1'])} | {percent(s['top5'])} |")
    return "\n".join(lines)


def differences(scores: dict[str, dict], reference: str = "control") -> list[dict]:
    """Each variant minus the reference on set (b), paired by prompt (bootstrap over the prompts)."""
    out = []
    for variant in scores:
        if variant == reference:
            continue
        for k in ("hits1", "hits5"):
            a, b = (np.asarray([scores[v]["b"][k]]) for v in (variant, reference))
            gap: Interval = difference([(a, np.ones_like(a))], [(b, np.ones_like(b))])
            ratio = a.mean() / b.mean() if b.mean() else float("inf")
            out.append({"variant": variant, "figure": f"top-{k[-1]}", "minus": reference, "difference": gap.to_dict(),
                        "ratio": ratio})
    return out


def difference_table(rows: list[dict]) -> str:
    lines = ["| set (b) | difference [95% interval] | ratio | separated |", "|---|---|---|---|"]
    for r in rows:
        d = r["difference"]
        lines.append(f"| {r['variant']} - {r['minus']}, {r['figure']} | {d['value']:+.1%} [{d['lo']:+.1%}, {d['hi']:+.1%}] "
                     f"| {r['ratio']:.2f}x | {'yes' if d['lo'] > 0 or d['hi'] < 0 else 'no'} |")
    return "\n".join(lines)


def scored(run: Path, llm_folders: list[str], root: Path, count: int | None, seed: int) -> dict:
    """`score_checkpoint` of a run's model, kept in `score.json` beside it and reused while the
    model file and the settings are the same."""
    from .ablation import sha256

    checkpoint = run / "model.safetensors"
    key = {"model_sha256": sha256(checkpoint), "llms": llm_folders, "count": count, "seed": seed}
    path = run / "score.json"
    if path.is_file() and (kept := json.loads(path.read_text()))["key"] == key:
        return kept["score"]
    score = score_checkpoint(checkpoint, llm_folders, root, count, seed)
    path.write_text(json.dumps({"key": key, "score": score}))
    return score


def study(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    shards = prepare(out, args.limit)
    control = random_llm(Path(args.models) / SMOLLM2, out / "models" / CONTROL)
    plan = variants(Path(args.models), control)
    train_all({n: train_command(v, shards, out / n, args.steps, args.seed) for n, v in plan.items()},
              out, args.steps, args.jobs)
    scores = {name: scored(out / name, list(variant["llms"].values()), shards.parent, args.count, args.seed)
              for name, variant in plan.items()}
    from .emoji_bench import OPENMOJI_TGZ, ceiling

    openmoji = REPO / OPENMOJI_TGZ
    bounds = ceiling(shards.parent, openmoji if openmoji.is_file() else None)
    result = {"limit": args.limit, "steps": args.steps, "ceiling": bounds, "scores": scores,
              "differences": differences(scores)}
    (out / "study.json").write_text(json.dumps(result, indent=1))
    text = f"{ceiling_table(bounds)}\n\n{table(scores)}\n\n{difference_table(result['differences'])}\n"
    (out / "table.md").write_text(text)
    print(text)
    return result


def bench(args: argparse.Namespace) -> dict:
    scores = {Path(args.checkpoint).stem: score_checkpoint(args.checkpoint, args.llm, args.data, args.count, args.seed)}
    text = table(scores) + "\n"
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(scores, indent=1))
        (args.out / "table.md").write_text(text)
    print(text)
    return scores
