"""LI-DiT LLM Loader: a local Hugging Face LLM as a frozen prompt encoder, managed by ComfyUI.

The decoder is loaded whole (no layer cut), so one loaded LLM serves every hidden layer an
encode node asks for; encoding stops at that layer, so the layers after it cost nothing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

import comfy.model_management as mm
import comfy.model_patcher

from ..lidit.llm import LLM, load_llm
from ..lidit.precision import cpu_has_native_bf16
from .folders import llm_names, resolve_llm

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class LLMWeights(nn.Module):
    """What the ModelPatcher moves between devices: the decoder and the final norm kept beside it.

    A plain Module, because ModelPatcher writes `.device` on the model it manages, which a
    transformers model (where `device` is a read-only property) refuses.
    """

    def __init__(self, llm: LLM) -> None:
        super().__init__()
        self.decoder = llm.model
        self.final_norm = llm.final_norm


@dataclass(eq=False)
class LoadedLLM:
    """The LIDIT_LLM value: lidit's LLM (tokenizer, name, layer count, final norm) + its patcher."""

    llm: LLM
    patcher: comfy.model_patcher.ModelPatcher

    @property
    def name(self) -> str:
        return self.llm.name

    @property
    def hidden_size(self) -> int:
        return self.llm.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.llm.model.parameters()).dtype


def auto_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device multiplies it natively, else fp32; never fp16, which LLM hidden states
    overflow (Gemma-3's reach ~1e5, float16 stops at 65504)."""
    if mm.is_device_cpu(device):
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32


class LIDiTLLMLoader:
    DESCRIPTION = ("Loads a local Hugging Face LLM (a folder under models/LLM) as a frozen prompt encoder. "
                   "ComfyUI moves it to the GPU to encode and offloads it afterwards.")
    CATEGORY = "LI-DiT"
    FUNCTION = "load"
    RETURN_TYPES = ("LIDIT_LLM",)
    RETURN_NAMES = ("llm",)
    OUTPUT_TOOLTIPS = ("The loaded LLM; one loader serves any hidden layer and any number of encode nodes.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "llm_name": (llm_names(), {"tooltip": "A Hugging Face model folder (with config.json) inside models/LLM. "
                                                  "Use the LLMs the LI-DiT checkpoint was trained with."}),
            "dtype": (["auto", "bf16", "fp16", "fp32"], {
                "default": "auto",
                "tooltip": "Weight precision. auto: bf16 where the device computes it natively (most GPUs; CPUs with "
                           "AVX512-BF16 or AMX), else fp32, never fp16: LLM states overflow it (e.g. Gemma's). "
                           "fp16 on CPU falls back to fp32 with a warning."}),
            "device": (["default", "cpu"], {
                "default": "default",
                "tooltip": "default: ComfyUI's text-encoder device (the GPU when there is room). "
                           "cpu: always encode on the CPU, keeping GPU memory for the diffusion model."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, llm_name: str):
        try:
            resolve_llm(llm_name)
        except (ValueError, FileNotFoundError) as e:
            return str(e)
        return True

    def load(self, llm_name: str, dtype: str, device: str) -> tuple[LoadedLLM]:
        folder = resolve_llm(llm_name)
        if device == "cpu":
            load_device = offload_device = torch.device("cpu")
        else:
            load_device, offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
        weight_dtype = auto_dtype(load_device) if dtype == "auto" else DTYPES[dtype]
        llm = load_llm(folder, layer=None, dtype=weight_dtype, device=offload_device, compute_device=load_device)
        logging.info("LI-DiT: loaded LLM %s from %s (%d layers, hidden %d, %s)", llm.name, folder, llm.total_layers,
                     llm.hidden_size, next(llm.model.parameters()).dtype)
        patcher = comfy.model_patcher.ModelPatcher(LLMWeights(llm), load_device=load_device, offload_device=offload_device)
        return (LoadedLLM(llm, patcher),)
