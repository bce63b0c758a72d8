"""A vision-language HF folder (Qwen2.5-VL, LLaVA): only its language model loads (the paper's LLMs
were LLaVA-tuned), and its states are the full model's language-model states."""
from __future__ import annotations

from pathlib import Path

import torch

from lidit.instruction import PromptTemplate, tokenize_prompts
from lidit.llm import encode, load_llm
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


def test_a_vision_language_folder_loads_its_language_model_only(tmp_path) -> None:
    import transformers

    folder = tiny_qwen25_vl(tmp_path / "Qwen2.5-VL-tiny")
    llm = load_llm(folder, layer=-2)
    names = [n for n, _ in llm.model.named_parameters()]
    assert names and not any("visual" in n or "vision" in n for n in names)  # no vision tower in memory
    assert len(llm.model.layers) == 1 and llm.total_layers == 2  # cut at the used layer, as for text LLMs

    full = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
    template = PromptTemplate(chat_template=False)
    prompts = ["a red circle", "a blue square left of a green triangle"]
    got = encode(llm, prompts, template, 32, layer=-2)
    batch = tokenize_prompts(llm.tokenizer, prompts, template, 32)
    with torch.no_grad():
        want = full.model.language_model(input_ids=batch.input_ids, attention_mask=batch.mask.long(),
                                         output_hidden_states=True).hidden_states[-2]
    m = batch.mask[..., None]
    torch.testing.assert_close(got.hidden * m, want * m, atol=1e-5, rtol=1e-5)
