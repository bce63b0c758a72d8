"""Configuration of an LI-DiT model: the text pathway, the DiT backbone and the diffusion objective.

Everything here is plain data that round-trips through JSON, because the config travels inside
every checkpoint's metadata and must describe the model without any code beside it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

PAPER_INSTRUCTION = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "and spatial relationships of the objects:"
)

#: what a config may hold, checked before any model is built: a damaged or hostile checkpoint's
#: metadata must not make a loader allocate terabytes (dotted field -> inclusive bounds)
LIMITS: dict[str, tuple[float, float]] = {
    "text.width": (1, 65536), "text.heads": (1, 1024), "text.refiner_depth": (0, 256), "text.collab_depth": (0, 256),
    "text.mlp_ratio": (0.01, 64), "text.max_tokens": (1, 1_048_576), "text.branches": (1, 64),
    "text.null_tokens": (0, 65536), "dit.pe_interpolation": (1e-6, 1_000_000),
    "branch.hidden_size": (1, 65536), "branch.layer": (-4096, 4096),
    "dit.depth": (1, 1024), "dit.hidden": (1, 65536), "dit.heads": (1, 1024), "dit.patch": (1, 256),
    "dit.in_channels": (1, 4096), "dit.mlp_ratio": (0.01, 64),
    "shift": (1e-6, 1_000_000), "resolution": (1, 1_048_576), "steps": (1, 1_048_576), "cfg": (0, 1_000_000),
}
PREDICTIONS = ("eps", "v", "flow")
DROP_INSTRUCTION = ("after_collab", "after_llm")
LATENT_FORMATS = ("pixel", "sd3", "flux", "sd15", "sdxl")
#: DDPM beta schedules (eps and v): "scaled_linear" is SD's (0.00085 .. 0.012, sqrt-spaced), ComfyUI's
#: default; "linear" is PixArt's (1e-4 .. 0.02)
SCHEDULES = ("scaled_linear", "linear")
#: the DiT's switches and their choices; the first choice of each is the paper's
DIT_CHOICES = {"pos_rule": ("grid", "pixart"), "adaln": ("per_block", "single"), "final_modulation": ("adaln", "table")}


@dataclass(frozen=True)
class LLMBranch:
    """One frozen LLM feeding the text pathway; `layer` indexes transformers' `hidden_states`."""

    name: str
    hidden_size: int
    layer: int = -3


@dataclass(frozen=True)
class TextConfig:
    """The LLM-infused diffuser: instruction, per-LLM token refiners and the collaborative refiner.

    `width`/`heads` size the refiners (the paper leaves them open; we project every LLM to one
    width so the collaborative refiner can mix branches of different hidden sizes).
    `drop_instruction` picks where the template tokens leave: after the collaborative refiner
    (the paper) or right after the LLM (HunyuanVideo). `null_tokens` > 0 gives the pathway a learned
    context of that many tokens for an empty prompt, in place of no context at all: a backbone
    trained with a learned unconditional caption (PixArt's `y_embedding`) keeps its CFG that way.
    """

    branches: tuple[LLMBranch, ...]
    width: int
    heads: int
    refiner_depth: int = 2
    collab_depth: int = 1
    mlp_ratio: float = 4.0
    max_tokens: int = 256
    drop_instruction: str = "after_collab"
    instruction: str = PAPER_INSTRUCTION
    system_prompt: str = ""
    chat_template: bool = True
    null_tokens: int = 0


@dataclass(frozen=True)
class DiTConfig:
    """The backbone. The defaults are the paper's; the switches express other DiTs exactly.

    - `pos_table` adds a fixed 2D sin-cos table before the conv ResBlock. The paper uses the conv
      ResBlock alone; at small scale an absolute table makes layout learn far faster, so it is a
      switch. `pos_rule` picks the table: "grid" (integer positions, rows then columns) or "pixart"
      (PixArt's grid scaled by `pe_interpolation` and a base size, columns then rows; None computes
      `pe_interpolation` from the size, as ComfyUI's PixArt does).
    - `qk_norm`: RMSNorm on queries and keys (the paper); `cross_query_norm`: LayerNorm on the
      cross-attention's query (PixArt feeds it the raw tokens).
    - `adaln`: "per_block" (an AdaLN Linear in every block) or "single" (PixArt's adaLN-single: one
      shared Linear plus a learned table per block); `final_modulation`: "adaln" (a Linear on
      SiLU(c)) or "table" (PixArt's: a learned table plus c).
    - `pooled`: add the pooled text to the timestep embedding (PixArt conditions on t alone).
    """

    depth: int
    hidden: int
    heads: int
    patch: int
    in_channels: int
    mlp_ratio: float = 4.0
    pos_table: bool = False
    pos_rule: str = "grid"
    pe_interpolation: float | None = None
    qk_norm: bool = True
    cross_query_norm: bool = True
    adaln: str = "per_block"
    final_modulation: str = "adaln"
    pooled: bool = True


@dataclass(frozen=True)
class LIDiTConfig:
    """A whole model. `prediction`: eps (the paper, DDPM), v (DDPM v-prediction) or flow.

    `x_param` (flow only) makes the network predict the clean image and derives the velocity
    from it, which trains better in pixel space with large patches. `shift` is the flow
    schedule shift; `schedule` the DDPM betas of eps and v; `latent_format` tells hosts how to
    decode (pixel = RGB in [-1, 1]).
    `resolution` (pixels) and `steps`/`cfg` are the training size and the sampling defaults,
    recorded by whoever trained the weights.
    """

    text: TextConfig
    dit: DiTConfig
    prediction: str = "eps"
    x_param: bool = False
    shift: float = 1.0
    schedule: str = "scaled_linear"
    latent_format: str = "sd3"
    resolution: int = 256
    steps: int = 30
    cfg: float = 4.5

    def __post_init__(self) -> None:
        for name, value in self._bounded_values():
            low, high = LIMITS[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"config field {name} = {value!r} is out of range: it must be a number from {low} "
                                 f"to {high}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.x_param and self.prediction != "flow":
            raise ValueError("x_param is only defined for prediction='flow'")
        if self.text.drop_instruction not in DROP_INSTRUCTION:
            raise ValueError(f"drop_instruction must be one of {DROP_INSTRUCTION}")
        if self.latent_format not in LATENT_FORMATS:
            raise ValueError(f"latent_format must be one of {LATENT_FORMATS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name, choices in DIT_CHOICES.items():
            if getattr(self.dit, name) not in choices:
                raise ValueError(f"dit.{name} must be one of {choices}, got {getattr(self.dit, name)!r}")
        if self.dit.pos_rule != "grid" and not self.dit.pos_table:
            raise ValueError("dit.pos_rule picks the table that dit.pos_table adds: set pos_table too")
        if not self.text.branches:
            raise ValueError("a model needs at least one LLM branch")
        for size, heads, what in ((self.text.width, self.text.heads, "text"),
                                  (self.dit.hidden, self.dit.heads, "dit")):
            if size % heads:
                raise ValueError(f"{what} width {size} is not divisible by its {heads} heads")

    def _bounded_values(self):
        """(dotted field, value) for every field in LIMITS; `branch.*` once per LLM branch."""
        yield "text.branches", len(self.text.branches)
        for branch in self.text.branches:
            yield from ((f"branch.{f}", getattr(branch, f)) for f in ("hidden_size", "layer"))
        for prefix, part in (("text.", self.text), ("dit.", self.dit), ("", self)):
            for f in dataclasses.fields(part):
                value = getattr(part, f.name)
                if prefix + f.name in LIMITS and f.name != "branches" and value is not None:
                    yield prefix + f.name, value

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LIDiTConfig:
        text = dict(d["text"])
        text["branches"] = tuple(LLMBranch(**b) for b in text["branches"])
        return cls(**{**d, "text": TextConfig(**text), "dit": DiTConfig(**d["dit"])})

    @classmethod
    def from_json(cls, s: str) -> LIDiTConfig:
        return cls.from_dict(json.loads(s))


def _big(depth: int, hidden: int, heads: int, resolution: int) -> LIDiTConfig:
    """The paper's presets: LLaMA3-8B and Qwen1.5-7B, 16-channel 8x latents, eps prediction."""
    branches = (LLMBranch("Meta-Llama-3-8B-Instruct", 4096), LLMBranch("Qwen1.5-7B-Chat", 4096))
    return LIDiTConfig(
        text=TextConfig(branches=branches, width=hidden, heads=heads),
        dit=DiTConfig(depth=depth, hidden=hidden, heads=heads, patch=2, in_channels=16),
        prediction="eps", latent_format="sd3", resolution=resolution,
    )


PRESETS: dict[str, LIDiTConfig] = {
    "lidit-1b": _big(28, 1152, 16, 256),
    "lidit-10b": _big(48, 2816, 44, 1024),
    # The demo: a pixel-space model small enough to train on a 2-core CPU in minutes.
    "demo": LIDiTConfig(
        text=TextConfig(
            branches=(LLMBranch("SmolLM2-135M-Instruct", 576), LLMBranch("gemma-3-270m", 640)),
            width=128, heads=4, max_tokens=48, chat_template=False,
        ),
        dit=DiTConfig(depth=4, hidden=128, heads=4, patch=8, in_channels=3, pos_table=True),
        prediction="flow", x_param=True, latent_format="pixel", resolution=64, steps=25, cfg=2.0,
    ),
    # For tests: sized for the tiny random LLMs that the test fixtures build.
    "tiny": LIDiTConfig(
        text=TextConfig(
            branches=(LLMBranch("tiny-llama", 64), LLMBranch("tiny-qwen2", 48)),
            width=32, heads=2, max_tokens=32, chat_template=False,
        ),
        dit=DiTConfig(depth=2, hidden=32, heads=2, patch=2, in_channels=3, pos_table=True),
        prediction="flow", latent_format="pixel", resolution=16, steps=4, cfg=2.0,
    ),
}


def preset(name: str) -> LIDiTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def with_branches(config: LIDiTConfig, branches: list[LLMBranch]) -> LIDiTConfig:
    """The same model fed by other LLMs (the refiners' input widths follow the branches)."""
    return dataclasses.replace(config, text=dataclasses.replace(config.text, branches=tuple(branches)))
