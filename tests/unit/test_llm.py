import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from lidit.instruction import PromptTemplate, resolve_instruction, tokenize_prompts
from lidit.llm import encode, layers_needed, load_llm

PLAIN = PromptTemplate(chat_template=False)


def test_loader_truncates_the_decoder_and_matches_hidden_states_minus_3(tiny_llm_dirs):
    for folder in tiny_llm_dirs.values():
        llm = load_llm(folder)
        assert len(llm.model.layers) == 2  # 4 layers, hidden_states[-3] is the output of layer 2
        assert not hasattr(llm.model, "lm_head")
        full = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        ids = llm.tokenizer(["a red circle and a blue square"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = full(ids, output_hidden_states=True).hidden_states[-3]
            got = llm.model(ids).last_hidden_state
        torch.testing.assert_close(got, want)


def test_layer_index_bounds():
    assert layers_needed(30, -3) == 28
    assert layers_needed(30, -1) == 30 and layers_needed(30, 0) == 0
    with pytest.raises(ValueError, match="does not exist"):
        layers_needed(4, -6)


def test_loader_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llm(tmp_path)


def test_a_folder_with_only_pickled_weights_is_refused_without_unpickling(tiny_llm_dirs, tmp_path, monkeypatch):
    import shutil

    folder = shutil.copytree(tiny_llm_dirs["tiny-llama"], tmp_path / "pickled")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 not to be read")

    def never(*args, **kwargs):
        raise AssertionError("torch.load was called")
    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(FileNotFoundError, match=r"no \.safetensors weights \(only pickled \['pytorch_model.bin'\]\)"):
        load_llm(folder)


def test_a_folders_tokenizer_is_loaded_once_until_its_files_change(tiny_llm_dirs, tmp_path):
    import os
    import shutil

    from lidit.llm import load_tokenizer

    folder = shutil.copytree(tiny_llm_dirs["tiny-llama"], tmp_path / "llm")
    first = load_tokenizer(folder)
    assert load_tokenizer(folder) is first and load_llm(folder).tokenizer is first
    stat = (folder / "tokenizer.json").stat()
    os.utime(folder / "tokenizer.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert load_tokenizer(folder) is not first


def test_fp16_on_cpu_falls_back_with_a_warning(tiny_llm_dirs):
    with pytest.warns(UserWarning, match="float16"):
        llm = load_llm(tiny_llm_dirs["tiny-llama"], dtype=torch.float16)
    assert next(llm.model.parameters()).dtype == torch.float32


def test_prompt_span_is_exact_with_and_without_chat_template(tiny_llms):
    for llm in tiny_llms:
        prompt_ids = llm.tokenizer("a red circle", add_special_tokens=False)["input_ids"]
        for template in (PromptTemplate(), PLAIN, PromptTemplate(instruction="", system_prompt="Be precise.")):
            batch = tokenize_prompts(llm.tokenizer, ["a red circle"], template, 32)
            assert batch.input_ids[0][batch.prompt[0]].tolist() == prompt_ids


def test_empty_prompt_and_truncation_warning(tiny_llms):
    llm = tiny_llms[0]
    states = encode(llm, ["", "a red circle, a blue square and a green triangle"], PLAIN, max_tokens=4)
    assert states.prompt[0].sum() == 0 and states.mask[0].sum() > 0
    with pytest.warns(UserWarning, match=r"truncated to max_tokens=4 \(dropped the last \d+\)"):
        states = encode(llm, ["a red circle, a blue square and a green triangle"], PLAIN, max_tokens=4)
    assert states.prompt.sum() == 4


def test_instruction_presets():
    assert resolve_instruction("paper").startswith("Describe the image by detailing the color")
    assert resolve_instruction("none") == ""
    assert resolve_instruction("custom", " Draw it. ") == "Draw it."
    with pytest.raises(ValueError, match="unknown instruction preset"):
        resolve_instruction("fancy")


def test_causal_llm_states_do_not_see_later_tokens(tiny_llms):
    with warnings.catch_warnings():
        a = encode(tiny_llms[0], ["a red circle"], PLAIN, 32)
        b = encode(tiny_llms[0], ["a red square"], PLAIN, 32)
    first = a.prompt[0].nonzero()[0, 0]
    torch.testing.assert_close(a.hidden[0, first], b.hidden[0, first])


def test_any_layer_of_a_fully_loaded_llm_matches_transformers(tiny_llm_dirs):
    folder = tiny_llm_dirs["tiny-qwen2"]
    llm = load_llm(folder, layer=None)
    assert len(llm.model.layers) == 4
    full = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    prompt = "a red circle and a blue square"
    ids = llm.tokenizer([prompt], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = full(ids, output_hidden_states=True).hidden_states
    calls = []
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in llm.model.layers]
    for layer in (-1, -3, 1, 0):
        calls.clear()
        got = encode(llm, [prompt], PromptTemplate(instruction="", chat_template=False), 32, layer=layer)
        torch.testing.assert_close(got.hidden[0], want[layer][0])
        assert len(calls) == layers_needed(4, layer)  # the layers after the chosen one never run
    for h in hooks:
        h.remove()
    with pytest.raises(ValueError, match="loaded with 2 of 4 layers"):
        encode(load_llm(folder), [prompt], PLAIN, 32, layer=-1)


def test_a_t5_encoder_gives_transformers_states_and_is_cut_at_the_layer(tmp_path):
    """PixArt's text encoder: T5's tokens of the caption and </s>, the states transformers gives, and
    no block after the one asked for is built."""
    import transformers

    from lidit.instruction import PromptTemplate
    from tests.fixtures_models import build_tiny_t5

    folder = build_tiny_t5(tmp_path / "t5")
    template = PromptTemplate(instruction="", chat_template=False)
    ref = transformers.T5EncoderModel.from_pretrained(folder).eval()
    batch = transformers.AutoTokenizer.from_pretrained(folder)(["a red circle", "x"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = ref(**batch, output_hidden_states=True)
    states = encode(load_llm(folder, layer=-1), ["a red circle", "x"], template, 32, layer=-1)
    assert torch.equal(states.mask, batch["attention_mask"].bool())  # </s> included: an encoder's own token
    torch.testing.assert_close(states.hidden, want.last_hidden_state * states.mask[..., None])
    cut = load_llm(folder, layer=-2)
    assert len(cut.layers) == 2 and cut.is_encoder
    torch.testing.assert_close(encode(cut, ["a red circle"], template, 32, layer=-2).hidden, want.hidden_states[-2][:1, :4])
