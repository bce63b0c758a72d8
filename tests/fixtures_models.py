"""Tiny random models for tests, built offline in seconds: HF LLM folders and LI-DiT checkpoints.

Shared by the unit ring (tests/unit/conftest.py) and the host ring (tests/host/lidit_assets.py),
so both test the same kind of model. Everything is seeded: the same call builds the same files.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import save_file

from lidit.checkpoint import save_checkpoint
from lidit.config import LIDiTConfig, LLMBranch, preset, with_branches
from lidit.model import LIDiTModel

CORPUS = [
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "and spatial relationships of the objects:",
    "a red circle, a blue square and a green triangle", "a yellow square", "a magenta triangle and a cyan circle",
    "a white circle, an orange square, a red triangle and a blue circle", "to the left a red circle, then a blue square",
]

#: decoder architectures a tiny LLM can have (all expose the `layers` + `norm` layout lidit cuts)
ARCHS = ("llama", "qwen2", "gemma3")


def tiny_tokenizer(chat: bool, t5: bool = False):
    """A byte-level BPE trained on CORPUS; `chat` adds a ChatML template, `t5` appends EOS (T5's
    </s>, and no BOS), otherwise it prepends BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if t5:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    elif not chat:  # Llama-style: the tokenizer itself prepends BOS
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None if t5 else "<s>", eos_token="</s>", pad_token="<pad>")
    if chat:  # ChatML, as Qwen2 and SmolLM2 use
        fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def build_tiny_llm(folder: str | Path, arch: str, hidden: int, chat: bool, layers: int = 4) -> Path:
    """Save a random `arch` decoder (with LM head) and its tokenizer as an HF folder."""
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }[arch]
    tok = tiny_tokenizer(chat)
    extra = {"head_dim": hidden // 4, "sliding_window": 16} if arch == "gemma3" else {}
    cfg = config_cls(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     **extra)
    torch.manual_seed(0)
    folder = Path(folder)
    model_cls(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_tiny_t5(folder: str | Path, hidden: int = 24, layers: int = 3) -> Path:
    """Save a random T5 encoder (what PixArt reads its captions with) and its tokenizer as an HF folder."""
    import transformers

    tok = tiny_tokenizer(chat=False, t5=True)
    cfg = transformers.T5Config(vocab_size=len(tok), d_model=hidden, d_kv=hidden // 4, d_ff=2 * hidden, num_layers=layers,
                                num_heads=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                decoder_start_token_id=tok.pad_token_id, feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    folder = Path(folder)
    transformers.T5EncoderModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def llm_branch(folder: str | Path, layer: int = -3) -> LLMBranch:
    """The branch an HF folder makes: its folder name and hidden size (from config.json)."""
    import json

    config = json.loads((Path(folder) / "config.json").read_text())
    hidden = config.get("hidden_size") or config["text_config"]["hidden_size"]
    return LLMBranch(Path(folder).name, int(hidden), layer)


def tiny_config(branches: list[LLMBranch], prediction: str = "flow", **overrides) -> LIDiTConfig:
    """The demo's geometry (64 px pixel space, patch 8, so 64 tokens) at the tiny preset's widths."""
    base = with_branches(preset("tiny"), branches)
    x_param = overrides.pop("x_param", prediction == "flow")
    return dataclasses.replace(base, dit=dataclasses.replace(base.dit, patch=8), prediction=prediction,
                               x_param=x_param, resolution=64, steps=4, cfg=2.0, **overrides)


def build_tiny_checkpoint(path: str | Path, config: LIDiTConfig, seed: int = 0) -> Path:
    """A random checkpoint whose every gate is open (a fresh init zeroes them), so every part
    of the model changes the output and a plumbing error cannot hide behind a zero."""
    torch.manual_seed(seed)
    model = LIDiTModel(config).init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model, extra={"note": "tiny random test checkpoint"})
    return path


#: the tiny Qwen3 text encoder that tests/host/server_nodes/lidit_tiny_text_encoders.py has ComfyUI build
#: (vocabulary: Qwen's 151936, which ComfyUI's bundled Qwen tokenizer needs)
TINY_QWEN3 = {"vocab": 151936, "hidden": 32, "intermediate": 64, "layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 8}


def build_tiny_qwen3_te(path: str | Path, seed: int = 0) -> Path:
    """A random Qwen3 text-encoder file in ComfyUI's key format (Comfy-Org's qwen_3_4b.safetensors
    layout: HF's Qwen3 keys without the LM head), float32, ~19 MB. Written without ComfyUI, so the
    host ring can provision it before any ComfyUI import; the in-process test checks its keys
    against ComfyUI's module."""
    from safetensors.torch import save_file

    c = TINY_QWEN3
    h, d, inter = c["hidden"], c["head_dim"], c["intermediate"]
    shapes = {"model.embed_tokens.weight": (c["vocab"], h), "model.norm.weight": (h,)}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (c["heads"] * d, h), p + "self_attn.k_proj.weight": (c["kv_heads"] * d, h),
            p + "self_attn.v_proj.weight": (c["kv_heads"] * d, h), p + "self_attn.o_proj.weight": (h, c["heads"] * d),
            p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    gen = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(s, generator=gen) * 0.02 if len(s) == 2 else 1 + 0.1 * torch.randn(s, generator=gen))
             for k, s in shapes.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


#: the tiny PixArt-Sigma that tests/host/server_nodes/lidit_tiny_pixart.py has ComfyUI build (width / 3 and
#: head size 12, as PixArt's 1152 and 72 are)
TINY_PIXART = {"hidden": 48, "heads": 4, "depth": 2, "caption": 24, "tokens": 8, "patch": 2, "channels": 4}


def build_tiny_pixart(path: str | Path, seed: int = 0) -> Path:
    """A random PixArt-Sigma transformer in PixArt's own key names, as UNETLoader reads it."""
    c, p, cap, ch = TINY_PIXART["hidden"], TINY_PIXART["patch"], TINY_PIXART["caption"], TINY_PIXART["channels"]
    shapes = {"x_embedder.proj.weight": (c, ch, p, p), "x_embedder.proj.bias": (c,),
              "t_embedder.mlp.0.weight": (c, 256), "t_embedder.mlp.0.bias": (c,), "t_embedder.mlp.2.weight": (c, c),
              "t_embedder.mlp.2.bias": (c,), "t_block.1.weight": (6 * c, c), "t_block.1.bias": (6 * c,),
              "y_embedder.y_embedding": (TINY_PIXART["tokens"], cap), "y_embedder.y_proj.fc1.weight": (c, cap),
              "y_embedder.y_proj.fc1.bias": (c,), "y_embedder.y_proj.fc2.weight": (c, c), "y_embedder.y_proj.fc2.bias": (c,),
              "final_layer.linear.weight": (p * p * 2 * ch, c), "final_layer.linear.bias": (p * p * 2 * ch,),
              "final_layer.scale_shift_table": (2, c)}
    for i in range(TINY_PIXART["depth"]):
        for name, shape in {"scale_shift_table": (6, c), "attn.qkv.weight": (3 * c, c), "attn.qkv.bias": (3 * c,),
                            "attn.proj.weight": (c, c), "attn.proj.bias": (c,), "cross_attn.q_linear.weight": (c, c),
                            "cross_attn.q_linear.bias": (c,), "cross_attn.kv_linear.weight": (2 * c, c),
                            "cross_attn.kv_linear.bias": (2 * c,), "cross_attn.proj.weight": (c, c),
                            "cross_attn.proj.bias": (c,), "mlp.fc1.weight": (4 * c, c), "mlp.fc1.bias": (4 * c,),
                            "mlp.fc2.weight": (c, 4 * c), "mlp.fc2.bias": (c,)}.items():
            shapes[f"blocks.{i}.{name}"] = shape
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) / s[-1] ** 0.5 for k, s in shapes.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, path)
    return path
