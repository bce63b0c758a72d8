"""ComfyUI text-encoder files as branch LLMs (lidit.text_encoder_file): the same states as the HF folder
of the same weights, fp8-scaled files dequantised as ComfyUI does, training from a file, clear errors.

Tolerances (float32): the file path and the HF-folder path build the same transformers class from the
same weights, so the states are expected bit-equal; asserted within 1e-6 absolute (measured: 0). An
fp8-scaled file against the HF folder of its dequantised weights: float32, the same bits (1e-6, measured
0); bfloat16, where the loader multiplies by the scale in bfloat16 as ComfyUI's ops do and the reference
rounds the float32 product once, 2e-2 absolute + 2e-2 relative (measured max |diff| / max |state| 8.0e-3).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lidit.text_encoder_file as tef
from lidit.instruction import PromptTemplate
from lidit.llm import encode, load_llm
from lidit.text_encoder_file import FAMILIES, TextEncoderFile, _hf_config
from lidit.train import TrainConfig, train
from lidit.train.config import llm_folders, model_config
from tests.fixtures_models import TINY_QWEN3, build_tiny_qwen3_te, tiny_tokenizer

torch.set_num_threads(1)
PROMPTS = ["a red circle", "a white circle, an orange square, a red triangle and a blue circle"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The tiny Qwen3 text-encoder file (float32), its tokenizer folder, and an fp8-scaled twin."""
    root = tmp_path_factory.mktemp("te")
    tiny_tokenizer(chat=True).save_pretrained(root / "tokenizer")
    return {"te": build_tiny_qwen3_te(root / "qwen_3_tiny.safetensors"), "tokenizer": root / "tokenizer",
            "root": root}


def spec(path: Path, tokenizer: Path, family: str = "qwen3_4b") -> dict:
    return {"text_encoder": str(path), "family": family, "tokenizer": str(tokenizer)}


def hf_folder(folder: Path, weights: dict[str, torch.Tensor], tokenizer: Path) -> Path:
    """The HF Qwen3 folder of these weights, configured by hand from ComfyUI's Qwen3_4BConfig constants."""
    import transformers

    c = TINY_QWEN3
    transformers.Qwen3Config(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                             num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                             num_key_value_heads=c["kv_heads"], head_dim=c["head_dim"], rms_norm_eps=1e-6,
                             rope_theta=1e6).save_pretrained(folder)
    save_file(weights, str(folder / "model.safetensors"))
    for f in tokenizer.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def fp8_scaled(weights: dict[str, torch.Tensor], scale_key: str) -> tuple[dict, dict]:
    """(the file as ComfyUI's scaled_fp8 converter writes it: linear weights float8_e4m3fn with a
    per-weight scale, the `scaled_fp8` marker, plus a vision tower and LM head that must be skipped;
    the dequantised float32 weights)."""
    stored, dequantised = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn),
                           "visual.blocks.0.attn.qkv.weight": torch.randn(8, 8),
                           "lm_head.weight": torch.randn(4, TINY_QWEN3["hidden"])}, {}
    for k, w in weights.items():
        if k.startswith("model.layers.") and w.ndim == 2:
            scale = w.abs().max() / 448
            q = (w / scale).to(torch.float8_e4m3fn)
            stored[k], stored[k[:-len("weight")] + scale_key] = q, scale.reshape(())
            dequantised[k] = q.float() * scale
        else:
            stored[k] = dequantised[k] = w
    return stored, dequantised


def compare(te_llm, hf_llm, layer: int, atol: float, rtol: float) -> float:
    """Same masks and spans; states within tolerance. Returns max |diff| / max |state|."""
    a = encode(te_llm, PROMPTS, PromptTemplate(), 64, layer)
    b = encode(hf_llm, PROMPTS, PromptTemplate(), 64, layer)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.prompt, b.prompt)
    torch.testing.assert_close(a.hidden, b.hidden, atol=atol, rtol=rtol)
    return float((a.hidden - b.hidden).abs().max() / b.hidden.abs().max())


def test_file_gives_the_states_of_the_hf_folder_of_the_same_weights(files, tmp_path) -> None:
    te = TextEncoderFile.from_spec(spec(files["te"], files["tokenizer"]))
    hf = load_llm(hf_folder(tmp_path / "hf", load_file(files["te"]), files["tokenizer"]), layer=None)
    for layer in (-3, -1, 0):
        llm = te.load(layer=layer)
        assert llm.name == "qwen3_4b" and llm.total_layers == TINY_QWEN3["layers"]
        assert len(llm.model.layers) == (TINY_QWEN3["layers"] + 1 + layer if layer < 0 else layer)
        gap = compare(llm, hf, layer, atol=1e-6, rtol=0)
        print(f"layer {layer}: max |diff| / max |state| = {gap:.2e}")
    assert te.hidden_size() == TINY_QWEN3["hidden"]


@pytest.mark.parametrize("scale_key", ["scale_weight", "weight_scale"])
def test_fp8_scaled_file_equals_its_dequantised_weights(files, tmp_path, scale_key) -> None:
    stored, dequantised = fp8_scaled(load_file(files["te"]), scale_key)
    save_file(stored, str(tmp_path / "fp8.safetensors"))
    te = TextEncoderFile.from_spec(spec(tmp_path / "fp8.safetensors", files["tokenizer"]))
    folder = hf_folder(tmp_path / "hf", dequantised, files["tokenizer"])
    gap = compare(te.load(), load_llm(folder), -3, atol=1e-6, rtol=0)
    print(f"fp8 ({scale_key}), float32: max |diff| / max |state| = {gap:.2e}")
    if scale_key == "scale_weight":  # the multiply in bfloat16, as ComfyUI's manual-cast ops do
        gap = compare(te.load(dtype=torch.bfloat16), load_llm(folder, dtype=torch.bfloat16), -3, atol=2e-2, rtol=2e-2)
        print(f"fp8, bfloat16: max |diff| / max |state| = {gap:.2e}")


def test_family_configs_keep_comfyuis_departures() -> None:
    """Sizes come from the shapes; ComfyUI's fixed head_dim, its rope without scaling, and Gemma-2
    without soft-capping or local layers."""
    def shapes(heads: int, kv: int, head_dim: int, hidden: int = 64, qnorm: bool = False) -> dict:
        s = {"model.embed_tokens.weight": (100, hidden), "model.layers.0.self_attn.q_proj.weight": (heads * head_dim, hidden),
             "model.layers.0.self_attn.k_proj.weight": (kv * head_dim, hidden),
             "model.layers.0.mlp.gate_proj.weight": (96, hidden), "model.layers.2.input_layernorm.weight": (hidden,)}
        return {**s, "model.layers.0.self_attn.q_norm.weight": (head_dim,)} if qnorm else s

    for family, fam in FAMILIES.items():
        c = _hf_config(family, shapes(4, 2, fam.head_dim))
        assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size) == \
               (fam.model_type, 3, 64, 96, 100)
        assert (c.head_dim, c.num_attention_heads, c.num_key_value_heads) == (fam.head_dim, 4, 2)
        assert c.rope_parameters == {"rope_type": "default", "rope_theta": fam.rope_theta}
        assert c.rms_norm_eps == fam.rms_norm_eps
    gemma = _hf_config("gemma2_2b", shapes(8, 4, 256))
    assert gemma.attn_logit_softcapping is None and gemma.layer_types == ["full_attention"] * 3
    assert gemma.query_pre_attn_scalar == 256 and gemma.hidden_activation == "gelu_pytorch_tanh"
    assert _hf_config("qwen3_4b", shapes(4, 2, 8, qnorm=True)).head_dim == 8  # from q_norm


def test_training_from_a_file_builds_the_cache_once(files, tmp_path, monkeypatch) -> None:
    loads = []
    real = tef.load_text_encoder
    monkeypatch.setattr(tef, "load_text_encoder", lambda *a, **kw: loads.append(1) or real(*a, **kw))
    branch = {"name": "qwen3_4b", "hidden_size": TINY_QWEN3["hidden"], "layer": -3}

    def run(out: str) -> dict:
        cfg = TrainConfig.from_dict({
            "model": {"preset": "tiny", "overrides": {"text": {"branches": [branch]}}},
            "llms": {"qwen3_4b": spec(files["te"], files["tokenizer"])}, "data": {"source": "scenes", "pool_size": 4},
            "output_dir": str(tmp_path / out), "cache_dir": str(tmp_path / "cache"), "steps": 2, "batch_size": 2,
            "checkpoint_every": 100, "device": "cpu", "progress": "none", "llm_dtype": "float32"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # prompt truncation at the tiny preset's max_tokens
            return train(cfg)

    first = run("a")
    assert len(loads) == 1 and first["features"][0]["encoded"] > 0
    assert Path(first["features"][0]["dir"]).name.startswith("qwen_3_tiny-")
    second = run("b")
    assert len(loads) == 1 and second["features"][0]["encoded"] == 0
    assert second["features"][0]["identity"] == first["features"][0]["identity"]
    assert (tmp_path / "b" / "model.safetensors").is_file()


def test_bad_inputs_say_what_is_wrong(files, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown text-encoder family 'qwen9'.*qwen3_4b"):
        TextEncoderFile.from_spec(spec(files["te"], files["tokenizer"], "qwen9"))
    with pytest.raises(ValueError, match="ComfyUI would load it as qwen3_4b"):
        TextEncoderFile.from_spec(spec(files["te"], files["tokenizer"], "llama")).load()
    save_file({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(4, 4)}, str(tmp_path / "clip_l.safetensors"))
    with pytest.raises(ValueError, match="clip_l.safetensors is not a decoder-LLM text encoder"):
        TextEncoderFile.from_spec(spec(tmp_path / "clip_l.safetensors", files["tokenizer"])).load()
    with pytest.raises(FileNotFoundError, match="has none of tokenizer.json"):
        TextEncoderFile.from_spec(spec(files["te"], tmp_path))
    with pytest.raises(ValueError, match="needs exactly the keys"):
        TextEncoderFile.from_spec({"text_encoder": str(files["te"])})
    cfg = TrainConfig.from_dict({"model": "tiny", "llms": [spec(files["te"], files["tokenizer"])] * 2})
    with pytest.raises(ValueError, match="hidden size 32, but branch tiny-llama expects 64"):
        llm_folders(cfg, model_config(cfg.model))
