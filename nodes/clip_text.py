"""LI-DiT Instructed Encode (CLIP): a decoder LLM that a stock ComfyUI text-encoder loader loaded,
as an LI-DiT branch.

Users of Lumina 2, Z-Image, HiDream, OmniGen2 or Qwen-Image already hold their LLM as a single
(often fp8) file in models/text_encoders; CLIPLoader, DualCLIPLoader, QuadrupleCLIPLoader and the
community's GGUF and MultiGPU loaders turn it into a `CLIP`. This node reads the hidden states of
that LLM with the same conventions as the HF path (`lidit.llm`): the same prompt template and
spans, `hidden_states[k]` with 0 = embeddings and -1 = the normed last layer, only the layers
needed computed. The weights go through the CLIP's own ModelPatcher, so offload, fp8, GGUF and
LoRA patches apply as for any ComfyUI text encoder.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import comfy.model_management as mm
from comfy.sd1_clip import SDClipModel
from comfy.text_encoders.llama import BaseLlama
from comfy.text_encoders.spiece_tokenizer import SPieceTokenizer

from ..lidit.instruction import CHAT_TEMPLATES, PromptTemplate, WithChatTemplate, tokenize_prompts
from ..lidit.llm import layers_needed, run_to_layer
from ..lidit.states import TextStates
from .encode import BranchIdentity, EncodedText, EncodeNode, encoded, prompt_inputs, prompt_template

#: what a user can load, for the error a CLIP without a decoder LLM gets (ComfyUI 0.3.75's decoder LLMs)
SUPPORTED = ("Gemma-2-2B (Lumina 2, gemma2_2b), Gemma-3-4B (gemma3_4b), Llama-3.1-8B (HiDream, llama), "
             "Qwen2.5-3B (OmniGen2, qwen25_3b), Qwen2.5-VL-7B (Qwen-Image, qwen25_7b), Qwen3-4B (Z-Image, qwen3_4b), "
             "Mistral-3-24B (Flux 2, mistral3_24b)")


TURN_MARKERS = ("<start_of_turn>", "<end_of_turn>")


class GemmaSentencePiece:
    """ComfyUI's SPieceTokenizer (Gemma's) with what `lidit.instruction` asks of an HF tokenizer,
    and Gemma's chat format, which ComfyUI does not ship.

    Gemma's format has no system turn (HF's Gemma-2 template raises on one), so
    `lidit.instruction` folds the system prompt into the user turn, as Gemma-3's template does.
    Special pieces written in the text (`<start_of_turn>`, `<bos>`) become their ids, as HF's do.
    """

    chat_template = "gemma"  # truthy: there is a chat format (apply_chat_template below)

    def __init__(self, spiece: SPieceTokenizer) -> None:
        self.sp = spiece.tokenizer
        self.bos_token_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.pad_token_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        # control pieces (<bos>, <pad>) never come out of encoding text; the turn markers do only if
        # the model declares them user-defined: map all of them by name
        special = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size()) if self.sp.is_control(i)}
        special.update({p: self.sp.piece_to_id(p) for p in TURN_MARKERS
                        if self.sp.piece_to_id(p) != self.sp.unk_id()})
        self.special = special
        self.split = re.compile("(" + "|".join(map(re.escape, sorted(special, key=len, reverse=True))) + ")")

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []
        for part in self.split.split(text):
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                ids += self.sp.encode(part, add_bos=False, add_eos=False)
        return {"input_ids": ids}

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        if any(m["role"] == "system" for m in messages):
            raise ValueError("Gemma's chat format has no system turn")
        turns = "".join(f"<start_of_turn>{'model' if m['role'] == 'assistant' else m['role']}\n"
                        f"{m['content'].strip()}<end_of_turn>\n" for m in messages)
        return "<bos>" + turns + ("<start_of_turn>model\n" if add_generation_prompt else "")


@dataclass(eq=False)
class ClipLLM:
    """A decoder LLM inside a CLIP: its name there (e.g. qwen3_4b, or llama in HiDream's quadruple),
    its ComfyUI transformer (a BaseLlama), its tokenizer (HF-like) and the pad id ComfyUI uses."""

    name: str
    transformer: nn.Module
    tokenizer: object
    pad_id: int

    @property
    def hidden_size(self) -> int:
        return self.transformer.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        return len(self.transformer.model.layers)


def describe_clip(clip) -> str:
    """What a CLIP holds, e.g. 'clip_l (CLIPTextModel)', for errors."""
    parts = [f"{name} ({type(getattr(m, 'transformer', m)).__name__})"
             for name, m in clip.cond_stage_model.named_children()]
    return ", ".join(parts) or type(clip.cond_stage_model).__name__


def decoder_llms(clip) -> list[ClipLLM]:
    """Every decoder LLM of ComfyUI's inside `clip`, in attribute order, each with its tokenizer."""
    found = []
    for name, module in clip.cond_stage_model.named_children():
        if not (isinstance(module, SDClipModel) and isinstance(module.transformer, BaseLlama)):
            continue
        tokenizer = getattr(getattr(clip.tokenizer, name, None), "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"the CLIP's {name} LLM has no tokenizer of the same name beside it; "
                             f"its tokenizer is a {type(clip.tokenizer).__name__}")
        if isinstance(tokenizer, SPieceTokenizer):
            tokenizer = GemmaSentencePiece(tokenizer)
        elif name in CHAT_TEMPLATES:
            tokenizer = WithChatTemplate(tokenizer, CHAT_TEMPLATES[name])
        found.append(ClipLLM(name, module.transformer, tokenizer, module.special_tokens.get("pad", 0)))
    return found


def find_llm(clip, encoder: str) -> ClipLLM:
    """The LLM named `encoder` in `clip`, or with 'auto' the first (logged, since a CLIP may hold several)."""
    llms = decoder_llms(clip)
    if not llms:
        raise ValueError(f"this CLIP holds no decoder LLM, only: {describe_clip(clip)}. LI-DiT encodes with a "
                         f"decoder LLM; load one of {SUPPORTED} with CLIPLoader (or Dual/QuadrupleCLIPLoader), "
                         "or an HF folder with the LI-DiT LLM Loader.")
    wanted = encoder.strip()
    if wanted in ("", "auto"):
        if len(llms) > 1:
            logging.info("LI-DiT: the CLIP holds the LLMs %s; encoding with the first, %s (set encoder to choose)",
                         [m.name for m in llms], llms[0].name)
        else:
            logging.info("LI-DiT: encoding with the CLIP's LLM %s", llms[0].name)
        return llms[0]
    for llm in llms:
        if llm.name == wanted:
            return llm
    raise ValueError(f"this CLIP has no LLM named {wanted!r}; it holds the LLMs {[m.name for m in llms]} "
                     f"(all it holds: {describe_clip(clip)}). Set encoder to one of those, or auto.")


def run_clip_to_layer(transformer: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, k: int,
                      check: Callable[[], None] | None = None) -> torch.Tensor:
    """`hidden_states[k]` of a ComfyUI decoder, computed as SDClipModel computes (float32 embeddings
    and activations; comfy.ops casts each weight); for k = the layer count, with its final norm."""
    embeds = transformer.get_input_embeddings()(input_ids, out_dtype=torch.float32)
    return run_to_layer(transformer.model.layers, k, lambda: transformer(
        None, attention_mask=mask.long(), embeds=embeds, num_tokens=mask.sum(1).tolist(), dtype=torch.float32)[0], check)


@torch.no_grad()
def encode_states(llm: ClipLLM, prompts: list[str], template: PromptTemplate, max_tokens: int, layer: int,
                  check: Callable[[], None] | None = None) -> TextStates:
    """`hidden_states[layer]` for a batch of prompts, float32, on the device of the LLM's embeddings
    (where ComfyUI's own encode runs it); padding is ComfyUI's pad id, masked out."""
    batch = tokenize_prompts(llm.tokenizer, prompts, template, max_tokens)
    device = llm.transformer.get_input_embeddings().weight.device
    mask = batch.mask.to(device)
    ids = batch.input_ids.masked_fill(~batch.mask, llm.pad_id).to(device)
    hidden = run_clip_to_layer(llm.transformer, ids, mask, layers_needed(llm.num_layers, layer), check)
    return TextStates(hidden.float() * mask[..., None], mask, batch.prompt.to(device))


class LIDiTInstructedEncodeCLIP(EncodeNode):
    DESCRIPTION = ("Encodes one prompt with a decoder LLM from a stock text-encoder loader (CLIPLoader and "
                   "friends: Gemma-2 of Lumina 2, Qwen3 of Z-Image, Llama-3.1 of HiDream, ...), wrapped in the "
                   "instruction, system prompt and chat template (paper §3.1). Same output as LI-DiT Instructed "
                   "Encode.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "From CLIPLoader, DualCLIPLoader, QuadrupleCLIPLoader (or a GGUF / MultiGPU "
                                         "loader) holding a decoder LLM: " + SUPPORTED + "."}),
            "encoder": ("STRING", {"default": "auto",
                                   "tooltip": "Which LLM inside the CLIP: auto takes the first decoder LLM (and logs "
                                              "which), or a name such as qwen3_4b, gemma2_2b, llama (HiDream)."}),
            **prompt_inputs(),
        }}

    def encode(self, clip, encoder: str, text: str, instruction: str, custom_instruction: str, system_prompt: str,
               chat_template: bool, hidden_layer: int, max_tokens: int) -> tuple[EncodedText]:
        llm = find_llm(clip, encoder)
        template = prompt_template(instruction, custom_instruction, system_prompt, chat_template)
        clip.load_model()
        mm.throw_exception_if_processing_interrupted()
        states = encode_states(llm, [text], template, max_tokens, hidden_layer,
                               check=mm.throw_exception_if_processing_interrupted).to(mm.intermediate_device())
        identity = BranchIdentity(llm.name, llm.hidden_size, hidden_layer, template)
        return (encoded(states, identity, "float32", "Check the text-encoder file's weights (a broken fp8 "
                                                     "conversion can hold inf)."),)
