"""Frozen LLMs as prompt encoders, loaded from local HF-format folders only.

Decoder-only LLMs, and T5-family encoders (PixArt's text encoder, the teacher of a distilled
pathway). No LM head or decoder stack is ever built (AutoModel is the bare decoder; for T5, the
encoder alone). When the caller knows the layer up
front, the decoder stack is cut right after it at load time; either way, encoding stops at the
requested layer, so the layers after it are never computed.
"""
from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .instruction import PromptTemplate, tokenize_prompts
from .states import TextStates

#: a folder needs one of these for AutoTokenizer (else transformers asks for sentencepiece or tiktoken)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


SUPPORTED_FOLDERS = ("LI-DiT encodes with the HF folders of decoder-only text LLMs (Llama, Qwen2, Qwen3, Gemma, "
                     "Gemma-2, Gemma-3, SmolLM2, Mistral), with the language model of vision-language folders "
                     "(Qwen2.5-VL, LLaVA), and with T5-family encoders (T5, mT5, UMT5).")
T5_TYPES = ("t5", "mt5", "umt5")


class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


@dataclass
class LLM:
    model: nn.Module         # decoder with its final norm replaced by Identity
    tokenizer: object
    name: str
    total_layers: int        # of the original model: layer indices refer to it
    final_norm: nn.Module    # applied only for the very last hidden state, as transformers does

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def is_encoder(self) -> bool:
        """A T5-style encoder: bidirectional, so a shared prefix's states depend on what follows it."""
        return getattr(self.model, "encoder", None) is not None

    @property
    def layers(self) -> nn.ModuleList:
        """The stack that `hidden_states` indexes: the decoder's layers, or a T5 encoder's blocks."""
        return self.model.encoder.block if self.is_encoder else self.model.layers

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


def load_llm(path: str | os.PathLike, layer: int | Sequence[int] | None = -3, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu", trust_remote_code: bool = False,
             compute_device: torch.device | str | None = None) -> LLM:
    """Local files only, safetensors only; `trust_remote_code` stays off unless the caller turns it on.

    `layer` (an index into `hidden_states`, or several) drops the layers after the deepest; None
    keeps them all, for callers that pick the layer per encode. `compute_device` is where the model will run when a
    host parks it on `device` in between (default: `device`); the fp16 fallback is judged there.
    """
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json in it)")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise FileNotFoundError(
            f"{path} holds no .safetensors weights{f' (only pickled {pickled[:3]})' if pickled else ''}. Pickled "
            "weights can run code when loaded and are never read here: get the model's safetensors files, or convert "
            "the folder once with transformers where you trust it (from_pretrained, then save_pretrained).")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}): copy them from "
                                "the model's repository into the folder, beside config.json.")
    kw = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path / 'config.json'} cannot be read as a transformers config: {e}. Get the model "
                         "folder again, or a transformers version that knows its architecture.") from None
    if config.model_type in T5_TYPES:
        return _load_t5(path, config, layer, safe_dtype(dtype, compute_device or device), device, kw)
    text_config = config.get_text_config()
    if getattr(config, "vision_config", None) is not None:
        # the paper's LLMs were LLaVA-tuned: build the language model alone; transformers maps its keys
        # out of the vision-language checkpoint and leaves the vision tower out
        config = text_config
    total = text_config.num_hidden_layers
    keep = total if layer is None else max(layers_needed(total, k) for k in ([layer] if isinstance(layer, int) else layer))
    text_config.num_hidden_layers = keep
    if isinstance(getattr(text_config, "layer_types", None), list):
        text_config.layer_types = text_config.layer_types[:keep]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the weights of the cut layers and the LM head are skipped on purpose
    try:
        model = AutoModel.from_pretrained(path, config=config, dtype=safe_dtype(dtype, compute_device or device),
                                          use_safetensors=True, **kw)
    finally:
        hf_logging.set_verbosity(verbosity)
    final_norm = getattr(model, "norm", None)
    if not isinstance(final_norm, nn.Module) or not isinstance(getattr(model, "layers", None), nn.ModuleList):
        raise NotImplementedError(
            f"{path.name}: {type(model).__name__} is not a decoder-only text LLM with a `layers` + `norm` stack. "
            f"{SUPPORTED_FOLDERS}")
    model.norm = nn.Identity()  # hidden_states[i < total] are raw layer outputs; only the last is normed
    model.requires_grad_(False).eval().to(device)
    final_norm.requires_grad_(False).to(device)
    return LLM(model, load_tokenizer(path, trust_remote_code), path.name, total, final_norm)


def _load_t5(path: Path, config, layer: int | Sequence[int] | None, dtype: torch.dtype, device: torch.device | str,
             kw: dict) -> LLM:
    """A T5-family encoder, cut after the deepest layer asked for; its final norm kept apart, as for decoders."""
    from transformers import AutoModelForTextEncoding
    from transformers.utils import logging as hf_logging

    total = config.num_layers
    config.num_layers = total if layer is None else \
        max(layers_needed(total, k) for k in ([layer] if isinstance(layer, int) else layer))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the weights of the cut layers are skipped on purpose
    try:
        model = AutoModelForTextEncoding.from_pretrained(path, config=config, dtype=dtype, use_safetensors=True, **kw)
    finally:
        hf_logging.set_verbosity(verbosity)
    final_norm, model.encoder.final_layer_norm = model.encoder.final_layer_norm, nn.Identity()
    model.requires_grad_(False).eval().to(device)
    final_norm.requires_grad_(False).to(device)
    return LLM(model, load_tokenizer(path, kw["trust_remote_code"]), path.name, total, final_norm)


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The folder's tokenizer, loaded once per version of its files per process. Tokenizers are
    never modified, and each load leaks native memory in the tokenizers library: a server that
    reloaded the demo's LLMs grew 13 MB per reload (measured, POST /free + a prompt), flat with this."""
    files = tuple((p.name, p.stat().st_mtime_ns) for p in sorted(path.iterdir())
                  if p.name.startswith(("tokenizer", "vocab", "spiece", "special_tokens", "added_tokens")))
    return _tokenizer(path, trust_remote_code, files)


@functools.lru_cache(maxsize=16)
def _tokenizer(path: Path, trust_remote_code: bool, files: tuple):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)


def run_to_layer(layers: Sequence[nn.Module], k: int, forward: Callable[[], torch.Tensor],
                 check: Callable[[], None] | None = None) -> torch.Tensor:
    """`hidden_states[k]` of a decoder stack: `forward()` runs the decoder, and a hook catches the input
    of `layers[k]` and stops it there, so no layer from k on is computed. With k = len(layers) it is
    `forward()`'s own output. `check` runs before every layer computed (a host's interrupt check: a
    long prompt takes a while). Shared by the HF path and ComfyUI's text encoders."""
    def stop(_module, args, kwargs):
        raise _Stop(args[0] if args else kwargs.get("hidden_states", kwargs.get("x")))

    handles = [layer.register_forward_pre_hook(lambda *_: check()) for layer in layers[:k]] if check else []
    if k < len(layers):
        handles.append(layers[k].register_forward_pre_hook(stop, with_kwargs=True))
    try:
        out = forward()
    except _Stop as caught:
        return caught.hidden
    finally:
        for handle in handles:
            handle.remove()
    if k < len(layers):
        raise RuntimeError(f"decoder layer {k} was never reached")
    return out


@torch.no_grad()
def encode(llm: LLM, prompts: list[str], template: PromptTemplate, max_tokens: int, layer: int = -3,
           check: Callable[[], None] | None = None) -> TextStates:
    """Hidden states `hidden_states[layer]` for a batch of prompts, on the LLM's device, in float32.
    `check` is called before every decoder layer (e.g. to honour a host's interrupt)."""
    batch = tokenize_prompts(llm.tokenizer, prompts, template, max_tokens)
    mask = batch.mask.to(llm.device)
    k = layers_needed(llm.total_layers, layer)
    if k > len(llm.layers):
        raise ValueError(f"{llm.name} was loaded with {len(llm.layers)} of {llm.total_layers} layers; "
                         f"hidden layer index {k} needs {k}: load it with more layers")
    ids = batch.input_ids.to(llm.device)
    hidden = run_to_layer(llm.layers, k, lambda: llm.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state,
                          check)
    if k == llm.total_layers:  # transformers norms only the very last hidden state
        hidden = llm.final_norm(hidden)
    return TextStates(hidden.float() * mask[..., None], mask, batch.prompt.to(llm.device))
