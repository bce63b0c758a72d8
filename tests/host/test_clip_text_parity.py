"""Same states, whichever loader: an LLM read through ComfyUI's text-encoder classes (the CLIP
path, nodes/clip_text.py) gives the hidden states the HF-folder path (lidit.llm) gives, so a
checkpoint trained on one path works on the other.

Both sides get the same weights and the same tokenizer. ComfyUI's configs are dataclasses, but
head_dim, the rope settings and Gemma-3's layer pattern are class attributes, fixed per model:
`comfy_config` sets them per instance from the HF config, and refuses what ComfyUI cannot
express (a rope scaling type other than none).

Stated tolerance, float32 on both sides: |diff| <= 1e-4 + 1e-4 * |HF state| per element (the two
implementations order their float32 sums differently). With the real demo LLMs: 2e-3 absolute +
1e-3 relative, over 30 (SmolLM2) or 18 (Gemma-3) layers whose states reach 2.4e4 and 1.0e5 (BOS).
Measured (max |diff| / max |state|, printed with -s): tiny models <= 9.4e-7 at layers 0, -3, -1;
SmolLM2 1.5e-8, gemma-3-270m 1.7e-7 at layer -3.
"""
from __future__ import annotations

import json
from pathlib import Path

import inproc
import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures_models import tiny_tokenizer

PROMPTS = ["a red circle", "a white circle, an orange square, a red triangle and a blue circle"]
REPO = Path(__file__).resolve().parents[2]


def comfy_config(hf):
    """ComfyUI's config for the HF config `hf` (transformers object), with the class attributes set on the instance."""
    import comfy.text_encoders.llama as llama

    cls = {"llama": llama.Llama2Config, "qwen3": llama.Qwen3_4BConfig, "gemma2": llama.Gemma2_2B_Config,
           "gemma3_text": llama.Gemma3_4B_Config}[hf.model_type]
    cfg = cls(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
              num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
              num_key_value_heads=hf.num_key_value_heads, max_position_embeddings=hf.max_position_embeddings,
              rms_norm_eps=hf.rms_norm_eps)
    cfg.head_dim = hf.head_dim
    rope = hf.rope_parameters
    if hf.model_type == "gemma3_text":
        local, full = rope["sliding_attention"], rope["full_attention"]
        assert local["rope_type"] == full["rope_type"] == "default", rope
        cfg.rope_theta, cfg.rope_scale = [local["rope_theta"], full["rope_theta"]], None
        # ComfyUI marks the full-attention layers (which take rope_theta[1]) with a window; it
        # implements no window at all: the same as HF's for prompts shorter than sliding_window
        cfg.sliding_attention = [hf.sliding_window if t == "full_attention" else False for t in hf.layer_types]
    else:
        assert rope["rope_type"] == "default", rope
        cfg.rope_theta = rope["rope_theta"]
    if hf.model_type in ("gemma2", "gemma3_text"):  # ComfyUI scales attention by head_dim ** -0.5
        assert hf.query_pre_attn_scalar == hf.head_dim
    if hf.model_type == "gemma2":  # ComfyUI's Gemma-2 has no attention logit soft-capping
        assert hf.attn_logit_softcapping is None
    return cfg


def comfy_decoder(folder: Path):
    """The HF folder's weights in ComfyUI's decoder (Llama2_ with comfy.ops, as a CLIP builds it)."""
    from transformers import AutoConfig

    import comfy.ops
    from comfy.text_encoders.llama import BaseLlama, Llama2_

    class Decoder(BaseLlama, torch.nn.Module):
        def __init__(self, config) -> None:
            super().__init__()
            self.model = Llama2_(config, device="cpu", dtype=torch.float32, ops=comfy.ops.manual_cast)

    hf = AutoConfig.from_pretrained(folder, local_files_only=True).get_text_config()
    decoder = Decoder(comfy_config(hf))
    weights = {k: v.float() for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    missing, _ = decoder.load_state_dict(weights, strict=False)
    assert not missing, missing
    return decoder.requires_grad_(False).eval()


def tiny_hf_llm(folder: Path, arch: str) -> Path:
    """A random 4-layer HF model of `arch` (head_dim 16, so ComfyUI's fixed head_dim must be overridden)."""
    import transformers

    tok = tiny_tokenizer(chat=True)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config, model = {
        "llama": (transformers.LlamaConfig(rope_theta=100000.0, **common), transformers.LlamaForCausalLM),
        "qwen3": (transformers.Qwen3Config(rope_theta=1000000.0, **common), transformers.Qwen3ForCausalLM),
        "gemma2": (transformers.Gemma2Config(query_pre_attn_scalar=16, attn_logit_softcapping=None, **common),
                   transformers.Gemma2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig(query_pre_attn_scalar=16, sliding_window=256,
                                                 layer_types=["sliding_attention", "full_attention"] * 2, **common),
                   transformers.Gemma3ForCausalLM),
    }[arch]
    torch.manual_seed(0)
    net = model(config)
    with torch.no_grad():  # Gemma's norms start at zero weight (1 + w): make every weight matter
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    net.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def both_paths(folder: Path, layer: int, prompts: list[str]):
    """(HF path states, CLIP path states) of `prompts` with the paper's template."""
    clip_text = inproc.sub("nodes.clip_text")
    template = inproc.sub("lidit.instruction").PromptTemplate()
    llm_mod = inproc.sub("lidit.llm")
    hf = llm_mod.load_llm(folder, layer=None, dtype=torch.float32)
    hf_states = llm_mod.encode(hf, prompts, template, 256, layer)
    clip_llm = clip_text.ClipLLM(folder.name, comfy_decoder(folder), hf.tokenizer, hf.tokenizer.pad_token_id or 0)
    return hf_states, clip_text.encode_states(clip_llm, prompts, template, 256, layer)


def assert_same_states(hf_states, clip_states, atol: float, rtol: float) -> float:
    """Same masks and spans; states within atol + rtol * |HF state|. Returns the largest relative gap."""
    assert torch.equal(hf_states.mask, clip_states.mask) and torch.equal(hf_states.prompt, clip_states.prompt)
    torch.testing.assert_close(clip_states.hidden, hf_states.hidden, atol=atol, rtol=rtol)
    return float((clip_states.hidden - hf_states.hidden).abs().max() / hf_states.hidden.abs().max())


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "gemma3"])
def test_tiny_random_llm_gives_the_same_states_through_comfyui_classes(pack, tmp_path, arch) -> None:
    folder = tiny_hf_llm(tmp_path / arch, arch)
    for layer in (0, -3, -1):
        hf_states, clip_states = both_paths(folder, layer, PROMPTS)
        assert hf_states.mask[0].sum() < hf_states.mask[1].sum()  # row 0 is padded
        gap = assert_same_states(hf_states, clip_states, atol=1e-4, rtol=1e-4)
        print(f"{arch} layer {layer}: max |diff| / max |state| = {gap:.2e}")
        # padding invariance: the short prompt alone gives the states it gives in the padded batch
        _, alone = both_paths(folder, layer, PROMPTS[:1])
        n = int(alone.mask.sum())
        torch.testing.assert_close(alone.hidden[0, :n], clip_states.hidden[0, :n], atol=1e-5, rtol=1e-5)
        assert not clip_states.hidden[0, n:].any()


@pytest.mark.parametrize("name", ["SmolLM2-135M-Instruct", "gemma-3-270m"])
def test_demo_llm_gives_the_same_states_through_comfyui_classes(pack, name) -> None:
    """SmolLM2 is ComfyUI's Llama (rope theta 1e5, head_dim 64, tied embeddings: no LM head is read);
    gemma-3-270m is ComfyUI's Gemma-3 with rope_scale None (Gemma3_4B's [1, 8] is the 4B's linear
    scaling) and its 5-local-1-global pattern. Neither loads through CLIPLoader as is: ComfyUI's
    detection maps any Llama file to Llama-3-8B's and any Gemma-3 file to Gemma-3-4B's fixed shapes."""
    folder = REPO / "models" / "LLM" / name
    if not (folder / "config.json").is_file():
        pytest.skip(f"needs {folder} (scripts/provision_llms.py)")
    torch.set_num_threads(1)
    hf_states, clip_states = both_paths(folder, -3, PROMPTS)
    gap = assert_same_states(hf_states, clip_states, atol=2e-3, rtol=1e-3)
    print(f"{name} layer -3: max |state| {hf_states.hidden.abs().max():.3g}, max |diff| / max |state| = {gap:.2e}")
    config = json.loads((folder / "config.json").read_text())
    assert clip_states.hidden.shape[-1] == config["hidden_size"]


#: the trainer's text-encoder families (lidit.text_encoder_file) -> ComfyUI's config class of that name
TE_FAMILIES = {"llama": "Llama2Config", "qwen25_3b": "Qwen25_3BConfig", "qwen25_7b": "Qwen25_7BVLI_Config",
               "qwen3_4b": "Qwen3_4BConfig", "gemma2_2b": "Gemma2_2B_Config"}


@pytest.mark.parametrize("family", TE_FAMILIES)
def test_trainer_reads_a_text_encoder_file_as_comfyuis_class_runs_it(pack, tmp_path, family) -> None:
    """A file written from ComfyUI's own class (its constants untouched: head_dim,
    rope theta, eps, activation, no soft-capping or window; only the sizes small) gives through
    lidit.text_encoder_file the states ComfyUI's class gives. Tolerance as for the tiny models above;
    measured max |diff| / max |state| <= 3.9e-7 at layers 0, -3, -1 (Gemma-2: 0). Changing one family
    constant (Llama's eps 1e-5 -> 1e-6, Gemma-2's rope theta 1e4 -> 1e5) fails it."""
    from safetensors.torch import save_file

    import comfy.ops
    import comfy.text_encoders.llama as llama

    clip_text = inproc.sub("nodes.clip_text")
    tef = inproc.sub("lidit.text_encoder_file")
    tiny_tokenizer(chat=True).save_pretrained(tmp_path / "tokenizer")
    config = getattr(llama, TE_FAMILIES[family])(vocab_size=400, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1)

    class Decoder(llama.BaseLlama, torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = llama.Llama2_(config, device="cpu", dtype=torch.float32, ops=comfy.ops.manual_cast)

    torch.manual_seed(0)
    decoder = Decoder().requires_grad_(False).eval()
    for p in decoder.parameters():  # ComfyUI allocates without init; Gemma's norms are 1 + w
        p.copy_(torch.randn_like(p) * 0.02 if p.ndim == 2 else 0.1 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(tmp_path / f"{family}.safetensors"))
    llm = tef.TextEncoderFile.from_spec({"text_encoder": str(tmp_path / f"{family}.safetensors"), "family": family,
                                         "tokenizer": str(tmp_path / "tokenizer")}).load(layer=None)
    for layer in (0, -3, -1):
        ours = inproc.sub("lidit.llm").encode(llm, PROMPTS, inproc.sub("lidit.instruction").PromptTemplate(), 256, layer)
        comfy = clip_text.encode_states(clip_text.ClipLLM(family, decoder, llm.tokenizer, 0), PROMPTS,
                                        inproc.sub("lidit.instruction").PromptTemplate(), 256, layer)
        gap = assert_same_states(comfy, ours, atol=1e-4, rtol=1e-4)
        print(f"{family} file, layer {layer}: max |diff| / max |state| = {gap:.2e}")
