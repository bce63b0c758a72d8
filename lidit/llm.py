"""Frozen LLMs as prompt encoders, loaded from local HF-format folders only.

The decoder stack is cut right after the layer whose output we use, so the layers after it are
neither loaded nor computed, and no LM head is built (AutoModel is the bare decoder).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .instruction import PromptTemplate, tokenize_prompts
from .text import TextStates


@dataclass
class LLM:
    model: nn.Module
    tokenizer: object
    name: str
    layer: int

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def layers_needed(num_layers: int, layer: int) -> int:
    """How many decoder layers produce `hidden_states[layer]` (index 0 is the embeddings)."""
    k = layer if layer >= 0 else num_layers + 1 + layer
    if not 0 <= k <= num_layers:
        raise ValueError(f"hidden layer {layer} does not exist in a model with {num_layers} layers "
                         f"(use -1 .. -{num_layers + 1} or 0 .. {num_layers})")
    return k


def safe_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """fp16 matmuls are slow or missing on CPUs: fall back to fp32 there, saying so."""
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        warnings.warn("float16 is not supported well on CPU; using float32 for the LLM instead", stacklevel=2)
        return torch.float32
    return dtype


def load_llm(path: str | os.PathLike, layer: int = -3, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu", trust_remote_code: bool = False) -> LLM:
    """Local files only; `trust_remote_code` stays off unless the caller turns it on."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json in it)")
    kw = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(path, **kw)
    text_config = config.get_text_config()
    total = text_config.num_hidden_layers
    keep = layers_needed(total, layer)
    text_config.num_hidden_layers = keep
    if isinstance(getattr(text_config, "layer_types", None), list):
        text_config.layer_types = text_config.layer_types[:keep]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the weights of the cut layers and the LM head are skipped on purpose
    try:
        model = AutoModel.from_pretrained(path, config=config, dtype=safe_dtype(dtype, device), **kw)
    finally:
        hf_logging.set_verbosity(verbosity)
    if keep < total:  # hidden_states[i < total] are raw layer outputs; only the last one is normed
        if not isinstance(getattr(model, "norm", None), nn.Module):
            raise NotImplementedError(f"{type(model).__name__}: cannot find its final norm to bypass")
        model.norm = nn.Identity()
    model.requires_grad_(False).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    return LLM(model, tokenizer, path.name, layer)


@torch.no_grad()
def encode(llm: LLM, prompts: list[str], template: PromptTemplate, max_tokens: int) -> TextStates:
    """Hidden states of the chosen layer for a batch of prompts, on the LLM's device, in float32."""
    batch = tokenize_prompts(llm.tokenizer, prompts, template, max_tokens)
    out = llm.model(input_ids=batch.input_ids.to(llm.device), attention_mask=batch.mask.long().to(llm.device))
    hidden = out.last_hidden_state.float() * batch.mask.to(llm.device)[..., None]
    return TextStates(hidden, batch.mask.to(llm.device), batch.prompt.to(llm.device))
