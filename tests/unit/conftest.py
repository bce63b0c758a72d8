"""Tiny random LLMs, built offline and saved as HF folders, loaded back through lidit's loader."""
from __future__ import annotations

import pytest
import torch

# The models here are tiny: extra threads only add overhead, and oversubscribe a busy 2-core machine.
torch.set_num_threads(1)

CORPUS = [
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "and spatial relationships of the objects:",
    "a red circle, a blue square and a green triangle", "a yellow square", "a magenta triangle and a cyan circle",
    "a white circle, an orange square, a red triangle and a blue circle", "to the left a red circle, then a blue square",
]


def _tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if not chat:  # Llama-style: the tokenizer itself prepends BOS
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat:  # ChatML, as Qwen2 and SmolLM2 use
        fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


@pytest.fixture(scope="session")
def tiny_llm_dirs(tmp_path_factory) -> dict[str, str]:
    """{'tiny-llama': dir, 'tiny-qwen2': dir}: hidden 64 / 48, 4 layers each."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("llms")
    out = {}
    for name, cls, cfg_cls, hidden, chat in (("tiny-llama", LlamaForCausalLM, LlamaConfig, 64, False),
                                             ("tiny-qwen2", Qwen2ForCausalLM, Qwen2Config, 48, True)):
        tok = _tokenizer(chat)
        torch.manual_seed(0)
        cfg = cfg_cls(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        folder = root / name
        cls(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
        out[name] = str(folder)
    return out


@pytest.fixture(scope="session")
def tiny_llms(tiny_llm_dirs):
    from lidit.llm import load_llm
    return [load_llm(tiny_llm_dirs["tiny-llama"]), load_llm(tiny_llm_dirs["tiny-qwen2"])]
