"""LI-DiT Instructed Encode (CLIP) in-process, on a CLIP that the stock CLIPLoader loads from a
tiny random Qwen3 file in ComfyUI's key format (server_nodes/lidit_tiny_text_encoders.py makes
ComfyUI's Qwen3-4B config tiny for it), through Token Refiner and Collaborative Fusion to the
sampler. The same graph runs on the real server as workflows/lidit_clip_text_encoder.json.
"""
from __future__ import annotations

import inproc
import pytest
import torch

PROMPT = "a red circle and a blue square"
LONGER = "a white circle, an orange square, a red triangle and a blue circle"
ARGS = dict(encoder="auto", instruction="paper", custom_instruction="", system_prompt="", chat_template=True,
            hidden_layer=-3, max_tokens=256)


@pytest.fixture(scope="module")
def tiny_te(pack, tmp_path_factory) -> dict:
    """{'clip': a stock CLIPLoader CLIP of the tiny Qwen3, 'ckpt': a checkpoint for it, 'root': folder}."""
    from safetensors.torch import load_file
    from server_nodes import lidit_tiny_text_encoders as tiny

    import folder_paths

    import nodes as comfy_nodes
    from tests.fixtures_models import build_tiny_checkpoint, build_tiny_qwen3_te, tiny_config

    root = tmp_path_factory.mktemp("clip_te")
    tiny.install()
    path = build_tiny_qwen3_te(root / "text_encoders" / "tiny_qwen3.safetensors")
    folder_paths.add_model_folder_path("text_encoders", str(root / "text_encoders"))
    (clip,) = comfy_nodes.CLIPLoader().load_clip("tiny_qwen3.safetensors", "lumina2")
    # the file is in ComfyUI's key format: every weight of ComfyUI's Qwen3 module, nothing else
    assert set(load_file(path)) == set(clip.cond_stage_model.qwen3_4b.transformer.state_dict())
    branch = inproc.sub("lidit.config").LLMBranch("qwen3_4b", tiny.HIDDEN, -3)
    ckpt = build_tiny_checkpoint(root / "qwen3.safetensors", tiny_config([branch]), seed=11)
    return {"clip": clip, "ckpt": ckpt, "root": root}


def encode(clip, text: str, **kw):
    (out,) = inproc.sub("nodes.clip_text").LIDiTInstructedEncodeCLIP().encode(clip, text=text, **{**ARGS, **kw})
    return out


def test_states_are_what_comfyuis_own_encode_computes(tiny_te) -> None:
    """Z-Image's template is Qwen3's chat format: with no instruction and no system prompt, the node
    feeds the very tokens ComfyUI's own encode feeds, and layer -3 is ComfyUI's layer_idx -3."""
    clip = tiny_te["clip"].clone()
    out = encode(clip, PROMPT, instruction="none")
    assert out.identity.llm_name == "qwen3_4b" and out.identity.hidden_size == 32 and out.identity.layer == -3
    clip.clip_layer(-3)
    tokens = clip.tokenize(PROMPT)
    ours = inproc.sub("lidit.instruction").tokenize_prompts(
        inproc.sub("nodes.clip_text").find_llm(clip, "auto").tokenizer, [PROMPT], out.identity.template, 256)
    assert ours.input_ids[0].tolist() == [t for t, *_ in tokens["qwen3_4b"][0]]
    cond = clip.encode_from_tokens(tokens)
    torch.testing.assert_close(out.states.hidden, cond.float(), atol=1e-5, rtol=1e-5)


def test_trainer_reads_the_same_file_into_the_same_states(tiny_te) -> None:
    """Issue 11 item 3: the trainer's loader (lidit.text_encoder_file) on the file CLIPLoader read, with
    ComfyUI's bundled Qwen tokenizer folder, gives the node's states, mask and prompt span (paper
    template, Qwen3's chat format), so features trained on the file are what the node feeds. Measured
    max |diff| 7.5e-9 on states up to 0.072; asserted within 1e-5 + 1e-5 relative."""
    from harness import find_comfyui_dir

    tokenizer = find_comfyui_dir() / "comfy" / "text_encoders" / "qwen25_tokenizer"
    te = inproc.sub("lidit.text_encoder_file").TextEncoderFile.from_spec(
        {"text_encoder": str(tiny_te["root"] / "text_encoders" / "tiny_qwen3.safetensors"), "family": "qwen3_4b",
         "tokenizer": str(tokenizer)})
    llm = te.load(layer=-3)
    node = encode(tiny_te["clip"].clone(), PROMPT)
    ours = inproc.sub("lidit.llm").encode(llm, [PROMPT], node.identity.template, 256, -3)
    assert llm.name == node.identity.llm_name and llm.hidden_size == node.identity.hidden_size
    assert torch.equal(ours.mask, node.states.mask) and torch.equal(ours.prompt, node.states.prompt)
    torch.testing.assert_close(ours.hidden, node.states.hidden, atol=1e-5, rtol=1e-5)


def test_prompt_span_padding_invariance_and_exact_instruction_drop(tiny_te) -> None:
    clip_text, instruction = inproc.sub("nodes.clip_text"), inproc.sub("lidit.instruction")
    clip = tiny_te["clip"]
    out = encode(clip, PROMPT, system_prompt="You draw shapes.")
    llm = clip_text.find_llm(clip, "qwen3_4b")
    batch = instruction.tokenize_prompts(llm.tokenizer, [PROMPT], out.identity.template, 256)
    assert torch.equal(out.states.prompt.cpu(), batch.prompt) and torch.equal(out.states.mask.cpu(), batch.mask)
    assert batch.input_ids[batch.prompt].tolist() == llm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    before, after = instruction.template_ids(llm.tokenizer, out.identity.template)
    text = llm.tokenizer.decode(before)
    assert text.startswith("<|im_start|>system\nYou draw shapes.<|im_end|>\n<|im_start|>user\nDescribe the image")
    assert llm.tokenizer.decode(after) == "<|im_end|>\n<|im_start|>assistant\n"
    # padding invariance: the prompt in a batch with a longer one gets the states it gets alone
    both = clip_text.encode_states(llm, [PROMPT, LONGER], out.identity.template, 256, -3)
    n = out.states.hidden.shape[1]
    assert both.hidden.shape[1] > n and not both.hidden[0, n:].any()
    torch.testing.assert_close(both.hidden[:1, :n], out.states.hidden, atol=1e-5, rtol=1e-5)
    # the instruction drop: after the collaborative refiner only the prompt's own tokens remain
    net = inproc.sub("nodes.host_model").build_lidit(str(tiny_te["ckpt"]), torch.float32, None,
                                                torch.device("cpu")).model.diffusion_model
    t = torch.tensor([0.4, 0.4])
    alone = net.text(net.text.prepare([out.states], torch.float32), t[:1])
    batched = net.text(net.text.prepare([both], torch.float32), t)
    n_prompt = int(out.states.prompt.sum())
    assert alone.tokens.shape[1] == int(alone.mask[0].sum()) == n_prompt == int(batched.mask[0].sum())
    torch.testing.assert_close(batched.tokens[0, :n_prompt], alone.tokens[0], atol=1e-5, rtol=1e-5)


def test_fusion_checks_the_hidden_size_and_the_graph_samples(tiny_te, tmp_path) -> None:
    from tests.fixtures_models import build_tiny_checkpoint, tiny_config

    text, model_mod = inproc.sub("nodes.fusion"), inproc.sub("nodes.host_model")
    pos, neg = (text.LIDiTTokenRefiner().route(encode(tiny_te["clip"], p), -1)[0] for p in (PROMPT, ""))
    model = model_mod.build_lidit(str(tiny_te["ckpt"]), torch.float32, None, torch.device("cpu"))
    (positive,), (negative,) = (text.LIDiTCollaborativeFusion().fuse(model, b) for b in (pos, neg))
    latent = inproc.ksample(model, positive, negative, seed=3)
    assert latent.shape == (1, 3, 64, 64) and torch.isfinite(latent).all()
    wide = inproc.sub("lidit.config").LLMBranch("qwen3_4b", 48, -3)
    other = model_mod.build_lidit(str(build_tiny_checkpoint(tmp_path / "w.safetensors", tiny_config([wide]))),
                                  torch.float32, None, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"trained on qwen3_4b \(hidden 48\) but gets qwen3_4b \(hidden 32\)"):
        text.LIDiTCollaborativeFusion().fuse(other, pos)


def test_encoder_names_and_a_clip_without_a_decoder_llm_get_clear_errors(tiny_te) -> None:
    from safetensors.torch import save_file

    import folder_paths

    import nodes as comfy_nodes

    with pytest.raises(ValueError, match=r"no LLM named 'gemma2_2b'; it holds the LLMs \['qwen3_4b'\]"):
        encode(tiny_te["clip"], PROMPT, encoder="gemma2_2b")
    # an SD1 CLIP-L from a tiny file (one tensor of CLIP-L's keys: ComfyUI detects the kind by key)
    folder = tiny_te["root"] / "text_encoders"
    save_file({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(3072, 768)}, str(folder / "clip_l.safetensors"))
    folder_paths.add_model_folder_path("text_encoders", str(folder))
    (clip_l,) = comfy_nodes.CLIPLoader().load_clip("clip_l.safetensors", "stable_diffusion")
    with pytest.raises(ValueError, match=r"holds no decoder LLM, only: clip_l \(CLIPTextModel\)\. .*Qwen3-4B"):
        encode(clip_l, PROMPT)


def test_gemma_sentencepiece_tokenizer_gets_gemmas_chat_format(pack) -> None:
    """Lumina 2's Gemma-2 comes with ComfyUI's SPieceTokenizer, which has no chat template: the node
    gives it Gemma's turns, the system prompt folded into the user turn (Gemma has no system turn),
    and writes special pieces as their ids. Here on a tiny sentencepiece model built like Gemma's
    (ids pad 0, eos 1, bos 2; <start_of_turn>/<end_of_turn> user-defined; no dummy prefix)."""
    import io

    import sentencepiece as spm

    from comfy.text_encoders.spiece_tokenizer import SPieceTokenizer

    from tests.fixtures_models import CORPUS

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=400, model_type="bpe", pad_id=0, eos_id=1,
        bos_id=2, unk_id=3, pad_piece="<pad>", bos_piece="<bos>", eos_piece="<eos>", unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], add_dummy_prefix=False, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    sot, eot = sp.piece_to_id("<start_of_turn>"), sp.piece_to_id("<end_of_turn>")
    tok = inproc.sub("nodes.clip_text").GemmaSentencePiece(SPieceTokenizer(buf.getvalue(), add_bos=True, add_eos=False))
    instruction = inproc.sub("lidit.instruction")
    template = instruction.PromptTemplate("Describe the image:", "Be brief.", True)
    before, after = instruction.template_ids(tok, template)
    assert before == [2, sot] + sp.encode("user\nBe brief.\n\nDescribe the image:\n")
    assert after == [eot] + sp.encode("\n") + [sot] + sp.encode("model\n")
    batch = instruction.tokenize_prompts(tok, [PROMPT], template, 256)
    assert batch.input_ids[batch.prompt].tolist() == sp.encode(PROMPT)
    plain = instruction.template_ids(tok, instruction.PromptTemplate("Describe the image:", "", False))
    assert plain == ([2] + sp.encode("Describe the image:\n"), [])
