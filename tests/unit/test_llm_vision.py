"""A vision-language HF folder (Qwen2.5-VL, LLaVA) is refused before any weight loads, with an
error that says what is supported and where such an LLM's language model works instead."""
from __future__ import annotations

from pathlib import Path

import pytest

from lidit.llm import load_llm
from tests.fixtures_models import tiny_tokenizer


def tiny_qwen25_vl(folder: Path) -> Path:
    import transformers

    tok = tiny_tokenizer(chat=True)
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64))
    transformers.Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_vision_language_folder_is_refused_before_loading_with_what_is_supported(tmp_path, monkeypatch) -> None:
    import transformers

    folder = tiny_qwen25_vl(tmp_path / "Qwen2.5-VL-tiny")

    def never(*args, **kwargs):
        raise AssertionError("weights were loaded (the vision tower with them)")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", never)
    with pytest.raises(NotImplementedError) as caught:
        load_llm(folder)
    message = str(caught.value)
    assert "Qwen2.5-VL-tiny is a vision-language model (qwen2_5_vl)" in message
    assert "decoder-only text LLMs (Llama, Qwen2, Qwen3, Gemma" in message
    assert "qwen_2.5_vl_7b_fp8_scaled.safetensors, CLIPLoader) into LI-DiT Instructed Encode (CLIP)" in message
