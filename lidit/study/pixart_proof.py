"""The CPU-scale proof of the PixArt route, as one resumable command: `python -m lidit study pixart`.

The claim it tests: a PixArt backbone converted to LI-DiT, with only the LLM pathway distilled from
PixArt on prompts alone, reaches PixArt's prompt following in a fraction of the time that LI-DiT
needs from scratch. No PixArt exists at this scale, so the command makes one:

1. **Teacher**: lidit's DiT with PixArt's switches (no QK-norm, PixArt's position table,
   adaLN-single, the final table, the linear schedule; v rather than eps, see `teacher_config`),
   fed by one frozen LLM standing in for T5 through PixArt's caption MLP and learned empty caption,
   trained on the scenes with the scratch config's optimiser settings. It is written in PixArt's
   own key names.
2. **Conversion**: `python -m lidit convert pixart` on that file, with the two LLMs of the student;
   the converted backbone must equal the teacher's exactly (checked).
3. **Prompt-only inputs**: the teacher draws one image per training caption; no scene image is
   rendered for the student.
4. **Student**: the converted checkpoint's pathway, distilled from the teacher (`teacher` and
   `trainable: pathway` of the trainer) on those drawings.
5. **From scratch**: the scratch config (the demo's) on the scenes.
6. **Scores**: the scene benchmark on every model, the student and the from-scratch run at
   snapshots along their runs, each with the CPU-seconds of its training (process time, so other
   jobs on the machine do not count), and the paired differences with 95% intervals.

Each stage leaves its result in `<out>` and is skipped when it is there: a teacher file, a
conversion, the drawings, a run whose snapshots reach its step count (an unfinished run continues
from its `resume/`), a score whose checkpoint hash and settings match. `--tiny` runs everything at
test size.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import load_checkpoint, read_metadata
from ..config import DiTConfig, LIDiTConfig, LLMBranch, TextConfig
from ..data.streams import SceneStream
from ..diffusion import training_loss
from ..dit import LIDiTBackbone
from ..layers import Attend, sdpa
from ..llm import LLM, encode, load_llm
from ..model import LIDiTModel
from ..pixart import main as convert_main
from ..precision import compute_dtype
from ..refiner import TextContext, fill_empty
from ..states import PreparedBranch, TextStates
from ..train.config import TrainConfig, load_config, model_config
from ..train.optim import EMA, make_optimizer
from ..train.schedule import ema_decay_at, lr_at
from ..train.teacher import CAPTION_ONLY
from ..train.trainer import Trainer
from . import scenes
from .ablation import sha256, write_json
from .benchmark import draw, score_model
from .report import Metric, pct, points, prompt_counts
from .stats import Interval, cluster_bootstrap, difference, wilson

SETS = ["plain", "paraphrase"]
#: the figures of the table: (metric, whether its interval is Wilson's over whole prompts)
FIGURES: dict[str, tuple[Metric, bool]] = {
    "objects": (Metric("plain", lambda n, k: True), False),
    "prompts": (Metric("plain", lambda n, k: True, whole_prompt=True), True),
    "paraphrases (objects)": (Metric("paraphrase", lambda n, k: True), False),
}


# --------------------------------------------------------------------------------------------------
# the teacher: a PixArt made of lidit's parts
# --------------------------------------------------------------------------------------------------
class CaptionMLP(nn.Module):
    """PixArt's text side: the frozen encoder's states through the T5 caption MLP (`y_proj`), and the
    learned empty caption (`y_embedding`) for a dropped caption, as `lidit.train.teacher` reads them."""

    def __init__(self, caption: int, width: int, null_tokens: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(caption, width)
        self.fc2 = nn.Linear(width, width)
        self.y_embedding = nn.Parameter(torch.randn(null_tokens, caption) / caption ** 0.5)

    def project(self, y: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(y), approximate="tanh"))

    def prepare(self, texts: list[TextStates], dtype: torch.dtype) -> list[PreparedBranch]:
        (states,) = texts
        tokens = self.project(states.hidden.to(dtype))
        return [PreparedBranch.of(tokens, tokens.new_zeros(tokens.shape[0], tokens.shape[2]), states.mask, states.prompt)]

    def forward(self, branches: list[PreparedBranch], t: torch.Tensor, attend: Attend = sdpa) -> TextContext:
        (b,) = branches
        lengths = [0 if p == 0 else n for n, p in zip(b.real, b.prompt_lengths)]
        tokens, mask, lengths = fill_empty(b.tokens, b.mask & b.prompt.any(-1, keepdim=True), lengths,
                                           self.project(self.y_embedding))
        return TextContext(tokens, mask, lengths)


class PixArtTeacher(LIDiTModel):
    """An LI-DiT model whose text pathway is PixArt's caption MLP: samplers and the benchmark take it
    as they take any checkpoint. The position ResBlock stays the identity PixArt lacks (zero last
    conv, frozen), so the backbone is exactly what `lidit.pixart` converts."""

    def __init__(self, config: LIDiTConfig) -> None:
        nn.Module.__init__(self)
        self.config = config
        (branch,) = config.text.branches
        self.text = CaptionMLP(branch.hidden_size, config.text.width, config.text.null_tokens)
        self.dit = LIDiTBackbone(config.dit, config.text.width)

    @torch.no_grad()
    def init_weights(self) -> PixArtTeacher:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.dit.t_embedder.fc1.weight, std=0.02)
        nn.init.normal_(self.dit.t_embedder.fc2.weight, std=0.02)
        zero = [self.dit.t_block, self.dit.final.linear, self.dit.pos_embed.conv2]
        for p in [p for m in zero for p in m.parameters()]:
            nn.init.zeros_(p)
        for table in [self.dit.final.scale_shift_table, *(b.scale_shift_table for b in self.dit.blocks)]:
            nn.init.zeros_(table)
        self.dit.pos_embed.requires_grad_(False)
        return self


def teacher_config(base: LIDiTConfig, encoder: LLMBranch, null_tokens: int, prediction: str = "v") -> LIDiTConfig:
    """PixArt's architecture at the size of `base`'s backbone, reading `encoder` at its last layer
    with the bare caption (no instruction, no chat template), as PixArt reads T5.

    Its width is raised, where needed, to hold a patch's values (patch² x channels): near t = 0 both
    eps and v are the noise, and a token narrower than its patch cannot carry white noise (at the
    demo's patch 8 over RGB, 192 values through 128 would floor the loss at 1 - 128/192).

    It predicts v, not PixArt's eps: in pixels at this width an eps network copies the noise with
    an error near 0.02 at every t, and the clean image it implies divides that error by
    sqrt(alpha_bar), which PixArt's linear schedule takes to 0.0064 at t = 999, so its samples are
    noise. v is the clean image at high noise, and the conversion is exact either way."""
    d = base.dit
    d = replace(d, hidden=max(d.hidden, -(-d.patch ** 2 * d.in_channels // d.heads) * d.heads))
    text = TextConfig(branches=(encoder,), width=d.hidden, heads=d.heads, max_tokens=null_tokens,
                      instruction=CAPTION_ONLY.instruction, system_prompt=CAPTION_ONLY.system_prompt,
                      chat_template=CAPTION_ONLY.chat_template, null_tokens=null_tokens)
    dit = DiTConfig(depth=d.depth, hidden=d.hidden, heads=d.heads, patch=d.patch, in_channels=d.in_channels,
                    pos_table=True, pos_rule="pixart", qk_norm=False, cross_query_norm=False, adaln="single",
                    final_modulation="table", pooled=False)
    return LIDiTConfig(text=text, dit=dit, prediction=prediction, schedule="linear", latent_format="pixel",
                       resolution=base.resolution, steps=20, cfg=4.5)


def to_pixart(model: PixArtTeacher) -> dict[str, torch.Tensor]:
    """The teacher under PixArt's own key names (`lidit.pixart.RULES` run backwards)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    pairs = {"dit.patch_embed": "x_embedder.proj", "dit.t_embedder.fc1": "t_embedder.mlp.0",
             "dit.t_embedder.fc2": "t_embedder.mlp.2", "dit.t_block": "t_block.1", "dit.final.linear": "final_layer.linear",
             "text.fc1": "y_embedder.y_proj.fc1", "text.fc2": "y_embedder.y_proj.fc2"}
    for i in range(model.config.dit.depth):
        src, dst = f"dit.blocks.{i}", f"blocks.{i}"
        pairs.update({f"{src}.self_attn.out": f"{dst}.attn.proj", f"{src}.cross_attn.q": f"{dst}.cross_attn.q_linear",
                      f"{src}.cross_attn.kv": f"{dst}.cross_attn.kv_linear", f"{src}.cross_attn.out": f"{dst}.cross_attn.proj",
                      f"{src}.mlp.fc1": f"{dst}.mlp.fc1", f"{src}.mlp.fc2": f"{dst}.mlp.fc2"})
    out = {f"{dst}.{end}": sd[f"{src}.{end}"] for src, dst in pairs.items() for end in ("weight", "bias")}
    for i in range(model.config.dit.depth):
        out[f"blocks.{i}.scale_shift_table"] = sd[f"dit.blocks.{i}.scale_shift_table"]
        for end in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{end}"] = torch.cat([sd[f"dit.blocks.{i}.self_attn.q.{end}"],
                                                          sd[f"dit.blocks.{i}.self_attn.kv.{end}"]])
    out["final_layer.scale_shift_table"] = sd["dit.final.scale_shift_table"]
    out["y_embedder.y_embedding"] = sd["text.y_embedding"]
    return out


def backbone_mismatches(converted: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> list[str]:
    """The backbone weights where a converted checkpoint differs from the teacher. The position
    ResBlock's first conv is left out: the converter draws it, and the zero second conv makes it unused."""
    keys = [k for k in teacher if k.startswith("dit.") and not k.startswith("dit.pos_embed.conv1.")]
    return [k for k in keys if k not in converted or not torch.equal(converted[k], teacher[k])]


# --------------------------------------------------------------------------------------------------
# the stages
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """Everything the stages share: where, the scratch config and what derives from it."""

    args: argparse.Namespace
    out: Path
    scratch: dict  # the from-scratch run's training config (the demo's, with this command's overrides)

    @property
    def train_cfg(self) -> TrainConfig:
        return TrainConfig.from_dict(self.scratch)

    @property
    def base(self) -> LIDiTConfig:
        cfg = self.train_cfg
        return model_config(cfg.model, cfg.data.resolution)

    def encoder(self) -> LLMBranch:
        folder = Path(self.args.encoder)
        hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
        return LLMBranch(folder.name, int(hidden), layer=-1)


def _stream(setup: Setup) -> SceneStream:
    cfg = setup.train_cfg
    return SceneStream.from_config(cfg.data.pool_size, setup.base.resolution, cfg.seed, 0, cfg.data.pool_seed,
                                   cfg.data.n_objects, scenes.training_styles(cfg.data.styles))


def _caption_states(llm: LLM, captions: list[str], max_tokens: int, batch: int = 64) -> dict[str, TextStates]:
    """Each caption's states from the frozen stand-in encoder, once: it never changes in training."""
    table = {}
    for start in range(0, len(captions), batch):
        chunk = captions[start:start + batch]
        states = encode(llm, chunk, CAPTION_ONLY, max_tokens, -1)
        table.update({c: states[i:i + 1] for i, c in enumerate(chunk)})
    return table


def train_teacher(setup: Setup) -> dict:
    """The teacher, trained on the scenes with the scratch config's optimiser settings; writes
    `teacher/pixart.safetensors` (PixArt's keys) and `teacher/teacher.safetensors` (its own)."""
    folder = setup.out / "teacher"
    stats_path = folder / "stats.json"
    if stats_path.is_file() and (folder / "pixart.safetensors").is_file():
        return json.loads(stats_path.read_text())
    a = setup.args
    cfg = TrainConfig.from_dict({**setup.scratch, "steps": a.teacher_steps})
    config = teacher_config(setup.base, setup.encoder(), a.null_tokens, a.teacher_prediction)
    print(f"pixart proof: training the teacher ({a.teacher_steps} steps)", flush=True)
    torch.manual_seed(cfg.seed)
    model = PixArtTeacher(config).init_weights()
    stream = _stream(setup)
    t0 = time.process_time()
    llm = load_encoder(a.encoder)
    table = _caption_states(llm, ["", *stream.captions], a.null_tokens)
    feature_seconds = time.process_time() - t0
    del llm
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt, ema = make_optimizer(cfg, named, torch.device("cpu")), EMA(named)
    generator, dropout = torch.Generator().manual_seed(cfg.seed), np.random.default_rng(cfg.seed)
    losses, t0, wall = [], time.process_time(), time.time()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        x0, captions = stream.next_batch(cfg.batch_size)
        captions = ["" if drop else c for c, drop in zip(captions, dropout.random(len(captions)) < cfg.caption_dropout)]
        loss = training_loss(model, config, x0, [TextStates.cat([table[c] for c in captions])], generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(ema_decay_at(cfg, step))
        losses.append(float(loss.detach()))
        if (step + 1) % cfg.log_every == 0:
            print(f"teacher step {step + 1}/{cfg.steps} loss {np.mean(losses[-cfg.log_every:]):.4f}", flush=True)
    cpu = time.process_time() - t0
    model.load_state_dict(ema.full_state(model))
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "teacher.safetensors",
              metadata={"lidit_config": config.to_json()})
    save_file(to_pixart(model), folder / "pixart.safetensors")
    stats = {"steps": cfg.steps, "cpu_seconds": round(cpu, 1), "wall_seconds": round(time.time() - wall, 1),
             "encoder_cpu_seconds": round(feature_seconds, 1), "last_loss": float(np.mean(losses[-cfg.log_every:]))}
    write_json(stats_path, stats)
    return stats


def load_encoder(folder: str) -> LLM:
    """The stand-in encoder in the dtype the trainer's `Teacher` reads it in, so that the teacher
    trained, drawn, scored and distilled from is one and the same function."""
    return load_llm(folder, layer=-1, dtype=compute_dtype(torch.device("cpu")))


def load_teacher(path: Path) -> PixArtTeacher:
    model = PixArtTeacher(LIDiTConfig.from_json(read_metadata(path)["lidit_config"]))
    model.load_state_dict(load_file(path))
    return model.eval()


def convert(setup: Setup) -> dict:
    """`python -m lidit convert pixart` on the teacher's file, then the exactness check."""
    out = setup.out / "student" / "converted.safetensors"
    pixart = setup.out / "teacher" / "pixart.safetensors"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        heads = setup.base.dit.heads
        convert_main([str(pixart), "--out", str(out), "--heads", str(heads), "--resolution", str(setup.base.resolution),
                      "--prediction", setup.args.teacher_prediction,
                      *(x for folder in setup.args.llm for x in ("--llm", folder))])
    teacher = load_teacher(setup.out / "teacher" / "teacher.safetensors")
    mismatched = backbone_mismatches(load_file(out), teacher.state_dict())
    derived = LIDiTConfig.from_json(read_metadata(out)["lidit_config"])
    if mismatched or derived.dit != teacher.config.dit or derived.prediction != teacher.config.prediction:
        raise SystemExit(f"the converted backbone differs from the teacher's: {mismatched[:3]} / {derived}")
    return {"checkpoint": str(out), "backbone_exact": True,
            "backbone_weights_compared": sum(1 for k in teacher.state_dict() if k.startswith("dit."))}


def draw_inputs(setup: Setup) -> dict:
    """The student's inputs without images: the teacher's own drawings of the first `samples`
    training captions, as an image folder (`name.png` + `name.txt`)."""
    folder = setup.out / "student" / "inputs"
    done = folder / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    from PIL import Image

    print(f"pixart proof: the teacher draws {setup.args.samples} prompts", flush=True)
    captions = _stream(setup).captions[:setup.args.samples]
    teacher = load_teacher(setup.out / "teacher" / "teacher.safetensors")
    llm = load_encoder(setup.args.encoder)
    t0 = time.process_time()
    images = draw(teacher, [llm], captions, seed=setup.train_cfg.seed)
    cpu = time.process_time() - t0
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, caption) in enumerate(zip(images, captions)):
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(caption + "\n")
    stats = {"images": len(images), "cpu_seconds": round(cpu, 1)}
    write_json(done, stats)
    return stats


class SnapshotTrainer(Trainer):
    """The trainer, keeping a copy of the EMA weights at every checkpoint with the CPU-seconds of
    the training loop so far (process time: setup and feature caching are not counted)."""

    def __init__(self, cfg: TrainConfig, resume: Path | None, prior_cpu: float) -> None:
        super().__init__(cfg, resume)
        self.cpu0, self.prior_cpu = time.process_time(), prior_cpu

    def checkpoint(self) -> None:
        super().checkpoint()
        snaps = self.out / "snapshots"
        snaps.mkdir(exist_ok=True)
        shutil.copyfile(self.out / "model.safetensors", snaps / f"step{self.step:06d}.safetensors")
        index = _snapshots(self.out)
        index[str(self.step)] = round(self.prior_cpu + time.process_time() - self.cpu0, 1)
        write_json(self.out / "snapshots.json", index)


def _snapshots(run: Path) -> dict[str, float]:
    try:
        return json.loads((run / "snapshots.json").read_text())
    except (OSError, ValueError):
        return {}


def train_run(config: dict, run: Path, label: str) -> dict[str, float]:
    """Train (or continue) one run to its step count; returns {step: CPU-seconds} of its snapshots."""
    cfg = TrainConfig.from_dict({**config, "output_dir": str(run)})
    index = _snapshots(run)
    if str(cfg.steps) in index:
        return index
    resume = run / "resume" if (run / "resume" / "state.json").is_file() else None
    step = json.loads((run / "resume" / "state.json").read_text())["step"] if resume else 0
    if resume is None:
        index = {}
        write_json(run / "snapshots.json", index)
    print(f"pixart proof: {'continuing' if resume else 'training'} {label} ({cfg.steps} steps)", flush=True)
    SnapshotTrainer(cfg, resume, index.get(str(step), 0.0)).run()
    return _snapshots(run)


def student_config(setup: Setup) -> dict:
    a = setup.args
    return {**setup.scratch, "init": str(setup.out / "student" / "converted.safetensors"), "trainable": "pathway",
            "llms": list(a.llm), "steps": a.student_steps, "checkpoint_every": a.student_every,
            "teacher": {"pixart": str(setup.out / "teacher" / "pixart.safetensors"), "text_encoder": a.encoder,
                        "layer": -1, "max_tokens": a.null_tokens},
            "data": {"source": f"folder:{setup.out / 'student' / 'inputs'}", "buckets": "none",
                     "resolution": setup.base.resolution}}


# --------------------------------------------------------------------------------------------------
# scores and the table
# --------------------------------------------------------------------------------------------------
class Scores:
    """Benchmark scores of checkpoints, each kept beside its checkpoint while hash and settings match."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.memo, self.llms = args, {}, {}

    def llm(self, folder: str, layer: int) -> LLM:
        if (folder, layer) not in self.llms:
            self.llms[folder, layer] = load_encoder(folder) if layer == -1 else \
                load_llm(folder, layer=layer, dtype=torch.float32)  # as the students were trained
        return self.llms[folder, layer]

    def __call__(self, checkpoint: Path, folders: list[str], label: str, load=load_checkpoint) -> dict:
        out = checkpoint.with_suffix(".score.json")
        want = {"sha256": sha256(checkpoint), "count": self.args.count, "seed": self.args.eval_seed, "sets": SETS}
        try:
            old = json.loads(out.read_text())
            if old["settings"] == want:
                return old
        except (OSError, ValueError, KeyError):
            pass
        print(f"pixart proof: scoring {label}", flush=True)
        model = load(checkpoint)
        llms = [self.llm(f, b.layer) for f, b in zip(folders, model.config.text.branches)]
        result = {"label": label, "settings": want,
                  **score_model(model, llms, SETS, self.args.count, self.args.eval_seed,
                                samples=checkpoint.with_suffix(".samples.png"), memo=self.memo)}
        write_json(out, result)
        return result


def figure_counts(score: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per figure, (1, prompts) arrays of right and counted objects (or whole prompts)."""
    out = {}
    for name, (metric, _) in FIGURES.items():
        right, counted = prompt_counts(score[metric.prompt_set]["object_correct"], metric)
        out[name] = np.array([right]), np.array([counted])
    return out


def intervals(score: dict) -> dict[str, Interval]:
    """Objects: cluster bootstrap over prompts (a prompt's objects share one image); whole prompts:
    Wilson's interval, prompts being independent draws."""
    out = {}
    for name, (right, counted) in figure_counts(score).items():
        out[name] = wilson(int(right.sum()), int(counted.sum())) if FIGURES[name][1] else cluster_bootstrap(right, counted)
    return out


def differences(a: dict, b: dict) -> dict[str, Interval]:
    """a minus b on every figure, paired by prompt (both scored on the same prompts)."""
    ca, cb = figure_counts(a), figure_counts(b)
    return {name: difference([ca[name]], [cb[name]]) for name in FIGURES}


def _cell(iv: Interval) -> str:
    return f"{pct(iv.value)} [{100 * iv.lo:.1f}, {100 * iv.hi:.1f}]"


def table(rows: list[dict], comparisons: list[tuple[str, dict, dict]]) -> str:
    """The figures per model, then each comparison's differences in points (bold: excludes 0)."""
    n = len(rows[0]["score"]["plain"]["object_correct"])
    lines = [f"| model | training CPU-min | steps | {' | '.join(FIGURES)} |", "|---|---|---|" + "---|" * len(FIGURES)]
    for row in rows:
        ivs = intervals(row["score"])
        lines.append(f"| {row['label']} | {row['cpu_seconds'] / 60:.1f} | {row['steps']} | "
                     + " | ".join(_cell(ivs[f]) for f in FIGURES) + " |")
    lines += ["", f"n = {n} prompts per set (plain, paraphrase), the same prompts and noise for every model. "
              "Objects: 95% cluster bootstrap over prompts; prompts (all objects right): Wilson 95% interval.", "",
              f"| difference, points | {' | '.join(FIGURES)} |", "|---|" + "---|" * len(FIGURES)]
    for label, a, b in comparisons:
        d = differences(a["score"], b["score"])
        lines.append(f"| {label} | " + " | ".join(points(d[f]) for f in FIGURES) + " |")
    lines += ["", "Differences: paired bootstrap over the shared prompts, 95% interval; bold where it excludes 0."]
    return "\n".join(lines)


def comparisons(teacher: dict, student: list[dict], scratch: list[dict]) -> list[tuple[str, dict, dict]]:
    """The student (last snapshot) against the teacher; every student snapshot and the teacher each
    against the first from-scratch snapshot with at least its CPU time, and against the run's end."""
    def equal(row: dict) -> dict:
        return next((r for r in scratch if r["cpu_seconds"] >= row["cpu_seconds"]), scratch[-1])

    last = student[-1]
    pairs = [(last, teacher), *((row, equal(row)) for row in student), (last, scratch[-1]), (teacher, equal(teacher)),
             (teacher, scratch[-1])]
    pairs = [p for i, p in enumerate(pairs) if p not in pairs[:i]]
    return [(f"{a['label']} - {b['label']}", a, b) for a, b in pairs]


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------
TINY = {"teacher_steps": 3, "student_steps": 2, "student_every": 1, "scratch_steps": 2, "scratch_every": 1,
        "samples": 4, "count": 2, "null_tokens": 16}
TINY_SCRATCH = {"model": {"preset": "tiny", "overrides": {"dit.patch": 8}}, "data": {"source": "scenes", "pool_size": 8,
                "resolution": 48}, "batch_size": 2, "warmup_steps": 1, "log_every": 1}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lidit study pixart", description=__doc__.split("\n\n")[0])
    p.add_argument("--llm", action="append", help="the student's LLM folders, in branch order (default: the scratch "
                   "config's, the demo's two)")
    p.add_argument("--encoder", default="models/LLM/SmolLM2-135M-Instruct",
                   help="the frozen encoder standing in for T5 (read at its last layer)")
    p.add_argument("--scratch-config", default="configs/demo.json", help="the from-scratch run's training config")
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--teacher-prediction", choices=("v", "eps"), default="v",
                   help="the teacher's target (PixArt's own is eps, which does not draw at this size)")
    p.add_argument("--scratch-steps", type=int, default=800)
    p.add_argument("--scratch-every", type=int, default=200, help="snapshot interval of the from-scratch run")
    p.add_argument("--student-steps", type=int, default=300)
    p.add_argument("--student-every", type=int, default=150, help="snapshot interval of the student")
    p.add_argument("--samples", type=int, default=300, help="captions the teacher draws for the student")
    p.add_argument("--null-tokens", type=int, default=48, help="PixArt's caption length (its y_embedding rows)")
    p.add_argument("--count", type=int, default=100, help="benchmark prompts per set")
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="out/pixart-proof")
    p.add_argument("--tiny", action="store_true", help="every stage at test size (seconds)")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def scratch_config(args: argparse.Namespace) -> dict:
    raw = load_config(args.scratch_config)
    raw = {**raw, **(TINY_SCRATCH if args.tiny else {}), "steps": args.scratch_steps, "checkpoint_every": args.scratch_every,
           "threads": args.threads, "llm_threads": args.threads, "max_minutes": None, "progress": "plain", "device": "cpu"}
    if args.llm:
        raw["llms"] = list(args.llm)
    else:
        raw_llms = raw["llms"]
        args.llm = list(raw_llms.values()) if isinstance(raw_llms, dict) else list(raw_llms)
    return raw


def check_settings(args: argparse.Namespace, out: Path) -> None:
    """A folder holds one proof: the stages it kept were made with these settings, or it is refused."""
    want = {k: v for k, v in vars(args).items() if k not in ("threads", "out")}
    path = out / "settings.json"
    if path.is_file() and json.loads(path.read_text()) != want:
        raise SystemExit(f"{out} holds a proof made with other settings ({path}): use another --out, or delete it")
    write_json(path, want, indent=1)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    setup = Setup(args, out, scratch_config(args))
    check_settings(args, out)
    started = time.time()
    teacher_stats = train_teacher(setup)
    conversion = convert(setup)
    inputs = draw_inputs(setup)
    student_snaps = train_run(student_config(setup), out / "student" / "run", "the student")
    scratch_snaps = train_run(setup.scratch, out / "scratch", "from scratch")

    score = Scores(args)
    teacher_row = {"label": "teacher (PixArt architecture)", "steps": teacher_stats["steps"],
                   "cpu_seconds": teacher_stats["cpu_seconds"],
                   "score": score(out / "teacher" / "teacher.safetensors", [args.encoder], "teacher", load_teacher)}
    student_rows = [{"label": f"student @{step}", "steps": int(step), "cpu_seconds": cpu + inputs["cpu_seconds"],
                     "score": score(out / "student" / "run" / "snapshots" / f"step{int(step):06d}.safetensors",
                                    args.llm, f"student @{step}")} for step, cpu in student_snaps.items()]
    scratch_rows = [{"label": f"from scratch @{step}", "steps": int(step), "cpu_seconds": cpu,
                     "score": score(out / "scratch" / "snapshots" / f"step{int(step):06d}.safetensors",
                                    args.llm, f"from scratch @{step}")} for step, cpu in scratch_snaps.items()]
    rows = [teacher_row, *student_rows, *scratch_rows]
    text = table(rows, comparisons(teacher_row, student_rows, scratch_rows))
    (out / "table.md").write_text(text + "\n")
    result = {"settings": vars(args), "teacher": teacher_stats, "conversion": conversion,
              "inputs": inputs, "student_snapshots": student_snaps, "scratch_snapshots": scratch_snaps,
              "rows": [{k: v for k, v in r.items() if k != "score"} | {"figures": {f: iv.to_dict() for f, iv in
                                                                           intervals(r["score"]).items()}}
                       for r in rows],
              "seconds_this_invocation": round(time.time() - started, 1)}
    write_json(out / "proof.json", result, indent=1)
    print(text, flush=True)
    return result
