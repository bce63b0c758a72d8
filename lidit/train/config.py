"""The training config: JSON file + dotted overrides -> TrainConfig, and the model config it names."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import LIDiTConfig, preset
from ..diffusion import FLOW_LOSSES
from ..lora import LoRAConfig
from ..precision import DTYPES
from ..text_encoder_file import TextEncoderFile
from .teacher import TeacherConfig

#: what a run trains: everything, or the LLM pathway (is_pathway_key) on a frozen backbone
TRAINABLE = ("all", "pathway")


@dataclass
class DataConfig:
    source: str = "scenes"              # "scenes", "folder:<path>" or "shards:<path>" (python -m lidit convert shards)
    pool_size: int = 2000               # scenes: distinct training captions (each is encoded once)
    pool_seed: int | None = None        # scenes: default = the run's seed
    n_objects: Any = None               # scenes: None (1..4), an int, or a list of counts
    styles: Any = "default"             # scenes: templates: "default" (the demo's five), "all" (scenes.TRAIN_STYLES) or a list
    resolution: int | None = None       # pixels; default = the model config's resolution
    buckets: Any = "auto"               # folder: "auto", "none" (one square bucket), or [[w, h], ...]
    vae: str | None = None              # folder + latent model: a local diffusers AutoencoderKL folder
    workers: int = 0                    # shards: DataLoader worker processes per rank (0: read in the loop's process)
    prefetch: int = 2                   # shards: batches each worker prepares ahead


@dataclass
class TrainConfig:
    model: Any = "demo"                 # preset name | {"preset": name, "overrides": {...}} | LIDiTConfig dict
    llms: Any = field(default_factory=dict)  # {branch name: LLM} or [LLM per branch]; an LLM is an HF folder or
    #                                          {"text_encoder": ComfyUI file, "family": "qwen3_4b", "tokenizer": folder}
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = "out/run"
    cache_dir: str = ".cache/lidit"     # feature (and latent) cache, shared by runs
    seed: int = 0
    steps: int = 1000
    batch_size: int = 32                # images per optimiser step, over all processes and accumulation
    grad_accum: int = 1
    lr: float = 1e-3
    lr_schedule: str = "constant"       # constant | cosine | linear (after warmup)
    lr_final: float = 0.1               # cosine/linear: final lr as a fraction of lr
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0              # 0 = off
    ema_decay: float = 0.999
    ema_warmup: bool = True             # decay min(ema_decay, (1 + step) / (10 + step))
    caption_dropout: float = 0.1
    flow_loss: str = "v"                # flow models: "v" (velocity MSE) or "x0" (clean-image MSE)
    lora: Any = None                    # {"base": checkpoint, "rank", "alpha", "targets"}: train adapters on a frozen checkpoint
    init: str | None = None             # start from this LI-DiT checkpoint (e.g. a converted PixArt); its config is the model's
    trainable: str = "all"              # all | pathway (text.* and the cross-attention K/V; the rest frozen)
    teacher: Any = None                 # {"pixart": file, "text_encoder": folder, "layer", "max_tokens"}: distil from PixArt
    activation_checkpointing: bool = False  # recompute each DiT block in the backward: memory for compute
    compile: str | None = None          # torch.compile each DiT block with this backend ("inductor"; "eager" traces only)
    checkpoint_every: int = 500
    log_every: int = 10
    max_minutes: float | None = None    # wall-clock budget from process start; saves and stops
    device: str = "auto"                # auto | cpu | cuda
    mixed_precision: str = "auto"       # auto (bf16 autocast where the device has native bf16) | bf16 | no
    threads: int | None = None          # torch.set_num_threads
    llm_threads: int | None = None      # threads while encoding features (default: threads)
    llm_batch_size: int = 64
    llm_dtype: str = "auto"             # auto (bf16 where the device has native bf16, else float32) | float32 | bfloat16
    feature_dtype: str = "float16"
    text_features: str = "offline"      # offline (encoded once, cached on disk) | online (the LLMs encode each batch)
    save_dtype: str = "float32"         # dtype of model.safetensors
    fsdp: bool = False
    progress: str = "auto"              # auto (tqdm on a terminal) | tqdm | plain | none
    rank_hashes: bool = False           # debug: every rank writes rank<N>.json with a hash of its weights
    async_checkpoint: bool = False      # write resume/ in the background (DCP async_save) while training goes on
    tensorboard: bool = False           # TensorBoard event files in output_dir/tb (pip install tensorboard)
    sample_every: int = 0               # steps between sample grids drawn with the EMA weights (0 = off)
    sample_prompts: list[str] | None = None  # the grid's prompts; default: 8 held-out scene prompts
    sample_steps: int | None = None     # sampler steps of grids and benchmark (default: the model config's)
    benchmark_every: int = 0            # steps between prompt-following benchmarks on the EMA weights (0 = off)
    benchmark_count: int = 16           # benchmark prompts: held-out scene combinations (the benchmark's set)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"_comment"})
        if unknown:
            raise ValueError(f"unknown training config field(s) {unknown}; known: {sorted(names)}")
        d.pop("_comment", None)
        data = d.get("data", {})
        if isinstance(data, str):
            data = {"source": data}
        dnames = {f.name for f in dataclasses.fields(DataConfig)}
        unknown = sorted(set(data) - dnames)
        if unknown:
            raise ValueError(f"unknown data config field(s) {unknown}; known: {sorted(dnames)}")
        d["data"] = DataConfig(**data)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lora_config(self) -> LoRAConfig | None:
        if self.lora is None:
            return None
        fields = {**self.lora, "targets": tuple(self.lora.get("targets", LoRAConfig.targets))}
        return LoRAConfig(**fields)

    def teacher_config(self) -> TeacherConfig | None:
        if self.teacher is None:
            return None
        try:
            return TeacherConfig(**self.teacher)
        except TypeError as e:
            raise ValueError(f"teacher takes pixart, text_encoder, layer and max_tokens: {e}") from None

    def validate(self) -> None:
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"lr_schedule must be constant, cosine or linear, got {self.lr_schedule!r}")
        if self.flow_loss not in FLOW_LOSSES:
            raise ValueError(f"flow_loss must be one of {FLOW_LOSSES}, got {self.flow_loss!r}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError("caption_dropout must be in [0, 1]")
        if self.grad_accum < 1 or self.batch_size < 1 or self.steps < 0:
            raise ValueError("batch_size and grad_accum must be >= 1 and steps >= 0")
        if self.sample_every < 0 or self.benchmark_every < 0 or self.benchmark_count < 1:
            raise ValueError("sample_every and benchmark_every must be >= 0 (0 = off), benchmark_count >= 1")
        if self.sample_prompts is not None and (not self.sample_prompts or
                                                not all(isinstance(p, str) for p in self.sample_prompts)):
            raise ValueError("sample_prompts must be a non-empty list of strings (or null for the default)")
        for name in ("feature_dtype", "save_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {sorted(DTYPES)}")
        if self.lora is not None:
            self.lora_config()
            if self.fsdp:
                raise ValueError("LoRA trains on one process or under DDP; --fsdp is for full training")
            if self.init is not None:
                raise ValueError("lora.base is the checkpoint LoRA starts from: leave init unset")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.teacher is not None:
            self.teacher_config()
            if not (self.init or self.lora is not None) or self.trainable != "pathway":
                raise ValueError("distilling from PixArt (teacher) trains the pathway of a converted checkpoint on its "
                                 "backbone, which is also the teacher's: set init (or lora.base) to the converted "
                                 "checkpoint and trainable: pathway")
        if not (self.data.source == "scenes" or self.data.source.startswith(("folder:", "shards:"))):
            raise ValueError(f"data.source must be 'scenes', 'folder:<path>' or 'shards:<path>', got {self.data.source!r}")
        if self.text_features not in ("offline", "online"):
            raise ValueError(f"text_features must be 'offline' or 'online', got {self.text_features!r}")
        if self.data.workers < 0 or self.data.prefetch < 1:
            raise ValueError("data.workers must be >= 0 and data.prefetch >= 1")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def set_dotted(d: dict, key: str, value: Any) -> None:
    """d['a']['b'] = value for key 'a.b', creating dicts on the way (a string leaf becomes a dict
    only where the schema allows it: `model: "demo"` becomes {"preset": "demo"})."""
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = d.get(part)
        if isinstance(nxt, str) and part == "model":
            nxt = {"preset": nxt}
        elif isinstance(nxt, str) and part == "data":
            nxt = {"source": nxt}
        elif not isinstance(nxt, dict):
            nxt = {}
        d[part] = nxt
        d = nxt
    d[parts[-1]] = value


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def model_config(spec: Any, resolution: int | None = None) -> LIDiTConfig:
    """A preset name, {"preset": name, "overrides": {dotted or nested}}, or a full LIDiTConfig dict."""
    if isinstance(spec, str):
        spec = {"preset": spec}
    if "text" in spec and "dit" in spec:
        base = dict(spec)
    else:
        base = preset(spec.get("preset", "demo")).to_dict()
        unknown = set(spec) - {"preset", "overrides"}
        if unknown:
            raise ValueError(f"model: unknown key(s) {sorted(unknown)} (use 'preset' and 'overrides')")
        for key, value in _flatten(spec.get("overrides", {})).items():
            node = base
            *path, last = key.split(".")
            for p in path:
                if not isinstance(node.get(p), dict):
                    raise ValueError(f"model override {key!r}: {p!r} is not a config section")
                node = node[p]
            if last not in node:
                raise ValueError(f"model override {key!r}: no field {last!r} (has {sorted(node)})")
            node[last] = value
    if resolution:
        base["resolution"] = resolution
    return LIDiTConfig.from_dict(base)


def load_config(path: str | None, overrides: Sequence[str] = ()) -> dict:
    d: dict = {}
    if path:
        d = json.loads(Path(path).read_text())
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        set_dotted(d, key.strip(), _parse_value(value))
    return d


def llm_folders(cfg: TrainConfig, model_cfg: LIDiTConfig) -> list[Path | TextEncoderFile]:
    """Each branch's LLM: an HF folder, or a ComfyUI text-encoder file (lidit.text_encoder_file), its
    hidden size checked against the branch's."""
    branches = model_cfg.text.branches
    if isinstance(cfg.llms, dict):
        missing = [b.name for b in branches if b.name not in cfg.llms]
        if missing:
            raise ValueError(f"llms has no LLM for branch(es) {missing}; it names {sorted(cfg.llms)}")
        specs = [cfg.llms[b.name] for b in branches]
    else:
        if len(cfg.llms) != len(branches):
            raise ValueError(f"llms lists {len(cfg.llms)} LLMs for {len(branches)} branches")
        specs = list(cfg.llms)
    from transformers import AutoConfig

    sources: list[Path | TextEncoderFile] = []
    for spec, branch in zip(specs, branches):
        if isinstance(spec, dict):
            source = TextEncoderFile.from_spec(spec)
            hidden = source.hidden_size()
        else:
            source = Path(spec)
            if not (source / "config.json").is_file():
                raise FileNotFoundError(f"LLM folder for branch {branch.name} not found: {source} (no config.json)")
            hidden = AutoConfig.from_pretrained(source, local_files_only=True).get_text_config().hidden_size
        if hidden != branch.hidden_size:
            raise ValueError(f"{source}: hidden size {hidden}, but branch {branch.name} expects {branch.hidden_size} "
                             f"(override model.overrides.text.branches)")
        sources.append(source)
    return sources
