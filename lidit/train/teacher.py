"""Prompt-only distillation of an LLM pathway from PixArt, which is its own teacher.

The converted backbone computes what PixArt computes when it is given PixArt's caption tokens
`y_proj(T5(caption))` (`lidit.pixart`). So teacher and student share the one frozen backbone and
differ only in their context: the teacher's comes from PixArt's text encoder through PixArt's
caption projection, the student's from the LLM pathway. The loss is the squared difference of the
two predictions on the same noisy input (`lidit.diffusion.distillation_loss`). A dropped caption
gets PixArt's learned empty caption on the teacher's side and the pathway's null context on the
student's, as CFG will pair them.

The pathway includes the backbone's cross-attention K/V projections, so the teacher keeps PixArt's
own and its context brings them (`TextContext.kv`), and LoRA adapters on the backbone are switched
off for its forward: the student's training never moves the teacher. The teacher's text encoder
runs on every micro-batch (no cache).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..instruction import PromptTemplate
from ..llm import encode, load_llm
from ..lora import adapters_off
from ..model import LIDiTModel
from ..pixart import caption_projection, depth_of, read_pixart
from ..precision import compute_dtype
from ..refiner import TextContext, fill_empty

#: PixArt reads its caption with no instruction and no chat template: T5's tokens of the caption and </s>
CAPTION_ONLY = PromptTemplate(instruction="", chat_template=False)


@dataclass(frozen=True)
class TeacherConfig:
    """`pixart`: the PixArt weights the student's backbone was converted from (for their caption
    projection and empty caption); `text_encoder`: PixArt's text encoder as an HF folder (T5; any
    encoder or LLM lidit reads stands in at small scale), read at hidden layer `layer`."""

    pixart: str
    text_encoder: str
    layer: int = -1
    max_tokens: int = 300


class Teacher:
    def __init__(self, config: TeacherConfig, device: torch.device) -> None:
        sd = read_pixart(config.pixart)
        self.projection = {k: v.to(device, torch.float32) for k, v in sd.items() if k.startswith("y_embedder.y_proj.")}
        self.null = caption_projection(self.projection, sd["y_embedder.y_embedding"].to(device, torch.float32))
        self.kv = [tuple(sd[f"blocks.{i}.cross_attn.kv_linear.{end}"].to(device) for end in ("weight", "bias"))
                   for i in range(depth_of(sd))]
        # bf16 where the device has it natively: T5-XXL is 9.5 GB so, 19 GB in float32
        self.encoder = load_llm(config.text_encoder, layer=config.layer, dtype=compute_dtype(device), device=device)
        self.config = config

    def context(self, captions: list[str], dtype: torch.dtype) -> TextContext:
        """PixArt's caption tokens for `captions`; an empty caption gets PixArt's learned empty caption."""
        states = encode(self.encoder, captions, CAPTION_ONLY, self.config.max_tokens, self.config.layer)
        tokens = caption_projection(self.projection, states.hidden)
        lengths = [0 if not caption else n for caption, n in zip(captions, states.mask.sum(1).tolist())]
        mask = states.mask & torch.tensor([n > 0 for n in lengths], device=tokens.device)[:, None]
        tokens, mask, lengths = fill_empty(tokens, mask, lengths, self.null)
        return TextContext(tokens.to(dtype), mask, lengths, self.kv)

    def predict(self, model: LIDiTModel, x_t: torch.Tensor, t: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """PixArt's prediction; `model`: the student as trained (the FSDP root, or the bare model)."""
        with adapters_off(model):
            return model(x_t, t, None, context=self.context(captions, x_t.dtype))
