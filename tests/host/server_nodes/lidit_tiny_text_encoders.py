"""Test-only ComfyUI custom-node module (it defines no nodes): a tiny Qwen3 text encoder that the
stock CLIPLoader can load.

ComfyUI builds each text encoder from a fixed config (Qwen3-4B: 4 B parameters, head_dim 128 as
a class attribute), whatever the file holds. While CLIPLoader reads a file whose embeddings are
HIDDEN wide, this makes its Qwen3 config tiny; any other file loads as usual. The test server
loads this folder as a custom_nodes path (tests/host/harness.py); in-process tests call install().
"""
from __future__ import annotations

import dataclasses
import functools

import comfy.sd
import comfy.text_encoders.llama as llama

HIDDEN = 32  # the sizes of tests/fixtures_models.py TINY_QWEN3 (its file is what this loads)


@dataclasses.dataclass
class TinyQwen3Config(llama.Qwen3_4BConfig):
    hidden_size: int = HIDDEN
    intermediate_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim = 8  # vocab_size stays Qwen's 151936


def _tiny(state_dict: dict) -> bool:
    weight = state_dict.get("model.embed_tokens.weight")
    return weight is not None and weight.shape[-1] == HIDDEN and "model.layers.0.self_attn.q_norm.weight" in state_dict


def install() -> None:
    """Wrap comfy.sd.load_text_encoder_state_dicts (what CLIPLoader calls); idempotent."""
    original = comfy.sd.load_text_encoder_state_dicts
    if getattr(original, "lidit_tiny", False):
        return

    @functools.wraps(original)
    def load(state_dicts=(), *args, **kwargs):
        if not any(_tiny(sd) for sd in state_dicts):
            return original(state_dicts, *args, **kwargs)
        real, llama.Qwen3_4BConfig = llama.Qwen3_4BConfig, TinyQwen3Config
        try:
            return original(state_dicts, *args, **kwargs)
        finally:
            llama.Qwen3_4BConfig = real

    load.lidit_tiny = True
    comfy.sd.load_text_encoder_state_dicts = load


install()
NODE_CLASS_MAPPINGS: dict = {}
