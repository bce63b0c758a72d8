"""ComfyUI's single-file text encoders (models/text_encoders) as LI-DiT branch LLMs, without ComfyUI.

The CLIP node encodes with ComfyUI's own classes; the trainer cannot import ComfyUI, so it reads the
same file into the transformers decoder that behaves as ComfyUI's class does (tests/host/
test_clip_text_parity.py proves the two equal on the same weights). A checkpoint trained on a file
then sees at training time the states users get from that file in ComfyUI.

- The family (ComfyUI's encoder name: qwen3_4b, llama, ...) gives the constants ComfyUI fixes per class,
  including where it departs from the reference model: no rope scaling (Llama-3.1's llama3 scaling),
  no attention soft-capping and no sliding window (Gemma-2). Sizes come from the tensor shapes, so a
  tiny test file loads through the same code.
- fp8-scaled files (ComfyUI's `scaled_fp8` marker, per-weight `scale_weight`; or `weight_scale`) are
  dequantised as ComfyUI's manual-cast ops do at run time: weight.to(dtype) * scale.to(dtype).
- Keys are HF's, unprefixed, as CLIPLoader reads them. Only the decoder's own keys are read, streamed
  one tensor at a time into the allocated model: a Qwen2.5-VL file's vision tower, the LM head and the
  layers after the used one are never loaded.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .instruction import CHAT_TEMPLATES, WithChatTemplate
from .llm import LLM, TOKENIZER_FILES, layers_needed, load_tokenizer, safe_dtype


@dataclass(frozen=True)
class Family:
    """ComfyUI's fixed constants of one text-encoder class (comfy/text_encoders/llama.py)."""

    what: str                  # the model, for messages
    model_type: str            # the transformers architecture that computes as ComfyUI's class does
    rope_theta: float
    rms_norm_eps: float
    head_dim: int              # ComfyUI's; a file with q/k norms gives its own from their length
    config: dict = field(default_factory=dict)  # ComfyUI's departures from the transformers defaults


_GEMMA2 = {"hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": None, "final_logit_softcapping": None}

#: keyed by ComfyUI's encoder names (as the CLIP node shows them)
FAMILIES = {
    "qwen3_4b": Family("Qwen3-4B (Z-Image)", "qwen3", 1e6, 1e-6, 128),
    "llama": Family("Llama-3.x-8B (HiDream's Llama-3.1-8B-Instruct; no llama3 rope scaling, as ComfyUI)",
                    "llama", 5e5, 1e-5, 128),
    "qwen25_7b": Family("Qwen2.5-VL-7B's language model (Qwen-Image)", "qwen2", 1e6, 1e-6, 128),
    "qwen25_3b": Family("Qwen2.5-3B (OmniGen2)", "qwen2", 1e6, 1e-6, 128),
    "gemma2_2b": Family("Gemma-2-2B (Lumina 2; no soft-capping, no sliding window, as ComfyUI)", "gemma2", 1e4, 1e-6,
                        256, _GEMMA2),
}

_SCALES = ("scale_weight", "weight_scale")  # ComfyUI's scaled_fp8 and its newer tensor-wise quant format
_PROBE_KEY = "model.layers.0.self_attn.q_proj.weight"


def family_names() -> str:
    return ", ".join(f"{name} ({f.what})" for name, f in FAMILIES.items())


def detect_family(keys: set[str]) -> tuple[str, ...]:
    """The families ComfyUI's detect_te_model (comfy/sd.py) would pick among for these keys (none: not a
    decoder LLM it knows); a file it cannot tell apart by keys (Qwen2.5-3B / 7B) gives both."""
    k = "model.layers.0."
    if k + "post_feedforward_layernorm.weight" in keys:
        return ("gemma3_4b",) if k + "self_attn.q_norm.weight" in keys else ("gemma2_2b",)
    if k + "self_attn.k_proj.bias" in keys:
        return "qwen25_3b", "qwen25_7b"
    if k + "post_attention_layernorm.weight" in keys:
        return ("qwen3_4b",) if k + "self_attn.q_norm.weight" in keys else ("llama",)
    return ()


@dataclass(frozen=True)
class TextEncoderFile:
    """A branch's LLM as a ComfyUI text-encoder file, its family and a local tokenizer folder."""

    path: Path
    family: str
    tokenizer: Path

    @classmethod
    def from_spec(cls, spec: dict) -> TextEncoderFile:
        """{"text_encoder": file, "family": name, "tokenizer": folder}, checked before anything loads."""
        want = {"text_encoder", "family", "tokenizer"}
        if set(spec) != want:
            raise ValueError(f"a text-encoder LLM entry needs exactly the keys {sorted(want)}, got {sorted(spec)}")
        if spec["family"] not in FAMILIES:
            raise ValueError(f"unknown text-encoder family {spec['family']!r}; known: {family_names()}")
        path, tokenizer = Path(spec["text_encoder"]), Path(spec["tokenizer"])
        if path.suffix != ".safetensors" or not path.is_file():
            raise FileNotFoundError(f"text encoder {path} is not a .safetensors file (only safetensors are read)")
        if not any((tokenizer / name).is_file() for name in TOKENIZER_FILES):
            raise FileNotFoundError(f"tokenizer folder {tokenizer} has none of {', '.join(TOKENIZER_FILES)} (for "
                                    "Qwen families, ComfyUI's comfy/text_encoders/qwen25_tokenizer works)")
        return cls(path, spec["family"], tokenizer)

    @property
    def name(self) -> str:
        return self.path.stem

    def __str__(self) -> str:
        return f"{self.path} ({self.family})"

    def hidden_size(self) -> int:
        """From the header only: the embedding's width."""
        with safe_open(os.fspath(self.path), framework="pt") as f:
            _check_family(self.path, set(f.keys()), self.family)
            return f.get_slice("model.embed_tokens.weight").get_shape()[1]

    def load(self, layer: int | Sequence[int] | None = -3, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu", compute_device: torch.device | str | None = None) -> LLM:
        return load_text_encoder(self, layer, dtype, device, compute_device)


def _check_family(path: Path, keys: set[str], family: str) -> None:
    """A file ComfyUI's CLIPLoader reads as `family` (its keys are HF's, unprefixed), else an error
    naming what ComfyUI would load it as."""
    if _PROBE_KEY not in keys:
        sample = ", ".join(sorted(keys)[:3])
        raise ValueError(f"{path.name} is not a decoder-LLM text encoder (no {_PROBE_KEY}; it holds e.g. {sample}). "
                         f"LI-DiT reads these families: {family_names()}")
    detected = detect_family(keys)
    if family not in detected:
        raise ValueError(f"{path.name} is not a {family} text encoder: ComfyUI would load it as "
                         f"{' or '.join(detected) or 'no LLM it knows'}")


def _hf_config(family: str, shapes: dict[str, tuple[int, ...]]):
    """The transformers config of ComfyUI's class for `family`, sized from the file's tensor shapes."""
    from transformers import AutoConfig

    fam = FAMILIES[family]
    p = "model.layers.0.self_attn."
    head_dim = shapes[p + "q_norm.weight"][0] if p + "q_norm.weight" in shapes else fam.head_dim
    vocab, hidden = shapes["model.embed_tokens.weight"]
    layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("model.layers."))
    extra = dict(fam.config)
    if fam.model_type == "gemma2":  # ComfyUI scales attention by head_dim ** -0.5 and has no local layers
        extra.update(query_pre_attn_scalar=head_dim, layer_types=["full_attention"] * layers)
    return AutoConfig.for_model(
        fam.model_type, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, head_dim=head_dim,
        intermediate_size=shapes["model.layers.0.mlp.gate_proj.weight"][0],
        num_attention_heads=shapes[p + "q_proj.weight"][0] // head_dim,
        num_key_value_heads=shapes[p + "k_proj.weight"][0] // head_dim, rms_norm_eps=fam.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": fam.rope_theta}, max_position_embeddings=32768,
        tie_word_embeddings=False, **extra)


def _read(f, key: str, keys: set[str], dtype: torch.dtype) -> torch.Tensor:
    """One tensor in `dtype`; a float8 weight times its scale, computed in `dtype` as ComfyUI's ops do."""
    t = f.get_tensor(key)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        base = key[:-len("weight")]
        scale = next((f.get_tensor(base + s) for s in _SCALES if base + s in keys), None)
        if scale is not None and scale.numel() != 1:
            raise NotImplementedError(f"{key}: block-wise float8 scales ({tuple(scale.shape)}) are not supported; "
                                      "use a tensor-wise fp8-scaled, bf16 or fp16 file")
        t = t.to(dtype)
        return t if scale is None else t * scale.to(dtype)
    return t.to(dtype)


def load_text_encoder(te: TextEncoderFile, layer: int | Sequence[int] | None = -3, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu", compute_device: torch.device | str | None = None) -> LLM:
    """The file's decoder as load_llm returns an HF folder's: cut after the deepest `layer` (None: all),
    frozen, in `dtype` on `device` (fp16 falls back to fp32 where `compute_device` is a CPU)."""
    from transformers import AutoModel
    from transformers.initialization import no_init_weights

    dtype = safe_dtype(dtype, compute_device or device)
    with safe_open(os.fspath(te.path), framework="pt") as f:
        keys = set(f.keys())
        _check_family(te.path, keys, te.family)
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys if k.startswith("model.")}
        config = _hf_config(te.family, shapes)
        total = config.num_hidden_layers
        keep = total if layer is None else max(layers_needed(total, k) for k in ([layer] if isinstance(layer, int) else layer))
        config.num_hidden_layers = keep
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:keep]
        with torch.device(device), no_init_weights():  # allocated, not initialised: every weight is read below
            model = AutoModel.from_config(config, dtype=dtype)
        params = dict(model.named_parameters())
        wanted = {"model." + name: name for name in params}
        missing = sorted(name for k, name in wanted.items() if k not in keys)
        if missing:
            raise ValueError(f"{te.path.name} lacks {len(missing)} weight(s) of a {te.family} decoder, e.g. "
                             f"{missing[:3]}: is it a {FAMILIES[te.family].what} text encoder?")
        with torch.no_grad():
            for k, name in wanted.items():
                tensor = _read(f, k, keys, dtype)
                if tensor.shape != params[name].shape:
                    raise ValueError(f"{te.path.name}: {k} has shape {tuple(tensor.shape)}, a {te.family} decoder "
                                     f"sized from the file expects {tuple(params[name].shape)}")
                params[name].copy_(tensor)
    final_norm = model.norm
    model.norm = nn.Identity()  # as load_llm: hidden_states[i < total] are raw layer outputs
    model.requires_grad_(False).eval()
    final_norm.requires_grad_(False)
    tokenizer = load_tokenizer(te.tokenizer)
    if te.family in CHAT_TEMPLATES:  # the model's own chat format, as the CLIP node uses
        tokenizer = WithChatTemplate(tokenizer, CHAT_TEMPLATES[te.family])
    return LLM(model, tokenizer, te.family, total, final_norm)
