"""LI-DiT Instructed Encode: one prompt through one LLM, with the paper's instruction around it.

The LLM runs here, once per prompt (ComfyUI caches the result until an input changes); the
timestep-conditioned refiners run later, inside the model at every sampling step. What both
encode nodes share (the widgets, the template, the identity, the finiteness check) lives here too:
the sibling node for ComfyUI's own text encoders is in clip_text.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import comfy.model_management as mm

from ..lidit.instruction import INSTRUCTION_PRESETS, PromptTemplate, resolve_instruction
from ..lidit.llm import encode
from ..lidit.states import TextStates
from .llm_loader import LoadedLLM


@dataclass(frozen=True)
class BranchIdentity:
    """Which LLM produced the states, and how: what a checkpoint's branch is checked against."""

    llm_name: str
    hidden_size: int
    layer: int
    template: PromptTemplate

    def describe(self) -> str:
        return f"{self.llm_name} (hidden {self.hidden_size})"


@dataclass(eq=False)
class EncodedText:
    """The LIDIT_TEXT value: the LLM's states of one prompt (batch 1) and where they came from."""

    states: TextStates
    identity: BranchIdentity


def prompt_inputs() -> dict:
    """The widgets of both encode nodes, in their saved order (text .. max_tokens)."""
    return {
        "text": ("STRING", {"multiline": True, "default": "",
                            "tooltip": "The prompt. May be empty (e.g. for the negative prompt)."}),
        "instruction": ([*INSTRUCTION_PRESETS, "custom"], {
            "default": "paper",
            "tooltip": "Instruction put before the prompt. paper: the LI-DiT instruction the demo was trained "
                       "with; none: no instruction; custom: the custom_instruction text."}),
        "custom_instruction": ("STRING", {"multiline": True, "default": "",
                                          "tooltip": "Used only when instruction is 'custom'."}),
        "system_prompt": ("STRING", {"multiline": True, "default": "",
                                     "tooltip": "Optional system turn of the chat template (or a plain prefix "
                                                "without a template). Empty: none."}),
        "chat_template": ("BOOLEAN", {"default": True,
                                      "tooltip": "Wrap the prompt in the tokenizer's chat template, if it has one."}),
        "hidden_layer": ("INT", {"default": -3, "min": -1000, "max": 1000,
                                 "tooltip": "Which hidden state to take: -1 is the last layer (normed), -3 the "
                                            "paper's choice; 0 is the embeddings. Use the layer the checkpoint "
                                            "was trained with."}),
        "max_tokens": ("INT", {"default": 256, "min": 1, "max": 8192,
                               "tooltip": "Longest prompt in tokens; longer prompts are cut, with a warning."}),
    }


def prompt_template(instruction: str, custom_instruction: str, system_prompt: str,
                    chat_template: bool) -> PromptTemplate:
    return PromptTemplate(resolve_instruction(instruction, custom_instruction), system_prompt.strip(), chat_template)


def encoded(states: TextStates, identity: BranchIdentity, dtype: object, hint: str) -> EncodedText:
    """The node output, once the states are known to be finite (an LLM can overflow its precision)."""
    if not torch.isfinite(states.hidden).all():
        raise ValueError(f"{identity.llm_name} produced inf/NaN hidden states in {dtype}: its activations exceed that "
                         f"precision. {hint}")
    return EncodedText(states, identity)


class EncodeNode:
    """What both encode nodes declare to ComfyUI: one LIDIT_TEXT out."""

    CATEGORY = "LI-DiT"
    FUNCTION = "encode"
    RETURN_TYPES = ("LIDIT_TEXT",)
    RETURN_NAMES = ("text",)
    OUTPUT_TOOLTIPS = ("The LLM's hidden states of the prompt (instruction tokens included, flagged), "
                       "for an LI-DiT Linguistic Token Refiner.",)


class LIDiTInstructedEncode(EncodeNode):
    DESCRIPTION = ("Encodes one prompt with an LLM, wrapped in the instruction, system prompt and chat template "
                   "(paper §3.1). Use one for the positive and one for the negative prompt; an empty text is fine.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"llm": ("LIDIT_LLM", {"tooltip": "From an LI-DiT LLM Loader."}), **prompt_inputs()}}

    def encode(self, llm: LoadedLLM, text: str, instruction: str, custom_instruction: str, system_prompt: str,
               chat_template: bool, hidden_layer: int, max_tokens: int) -> tuple[EncodedText]:
        template = prompt_template(instruction, custom_instruction, system_prompt, chat_template)
        llm.serve(hidden_layer)
        # whole: transformers modules cannot stream weights per layer as comfy.ops layers do
        mm.load_models_gpu([llm.patcher], force_full_load=True)
        mm.throw_exception_if_processing_interrupted()
        states = encode(llm.llm, [text], template, max_tokens, hidden_layer,
                        check=mm.throw_exception_if_processing_interrupted).to(mm.intermediate_device())
        identity = BranchIdentity(llm.name, llm.hidden_size, hidden_layer, template)
        return (encoded(states, identity, llm.dtype,
                        "Load it with dtype auto, bf16 or fp32 in the LI-DiT LLM Loader."),)
