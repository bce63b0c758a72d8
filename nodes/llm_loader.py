"""LI-DiT LLM Loader: a local Hugging Face LLM as a frozen prompt encoder, managed by ComfyUI.

Only the decoder layers the graph uses are loaded: the loader reads, in the queued graph, the
`hidden_layer` of every Instructed Encode it feeds and cuts the decoder after the deepest (for
LI-DiT's -3, the last two layers are never loaded: 0.87 GB of Llama-3-8B in bf16). When that is
not known (another node reads the LLM, or a layer comes from a link), every layer is loaded. If a
later graph asks a cached loader for a deeper layer, the encode node reloads it deeper.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import comfy.model_management as mm
import comfy.model_patcher

from ..lidit.llm import LLM, layers_needed, load_llm
from ..lidit.precision import DTYPES, compute_dtype, cpu_has_native_bf16
from .folders import llm_names, resolve_llm
from .memory import release_free_memory


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
    """The LIDIT_LLM value: lidit's LLM (tokenizer, name, layer count, final norm) + its patcher,
    and how it was loaded, to reload it deeper."""

    llm: LLM
    patcher: comfy.model_patcher.ModelPatcher
    folder: Path
    weight_dtype: torch.dtype
    load_device: torch.device
    offload_device: torch.device

    @classmethod
    def load(cls, folder: Path, layers: list[int] | None, weight_dtype: torch.dtype, load_device: torch.device,
             offload_device: torch.device) -> LoadedLLM:
        release_free_memory()
        llm = load_llm(folder, layer=layers, dtype=weight_dtype, device=offload_device, compute_device=load_device)
        logging.info("LI-DiT: loaded LLM %s from %s (%d of %d layers, hidden %d, %s)", llm.name, folder,
                     len(llm.layers), llm.total_layers, llm.hidden_size, next(llm.model.parameters()).dtype)
        patcher = comfy.model_patcher.ModelPatcher(LLMWeights(llm), load_device=load_device, offload_device=offload_device)
        return cls(llm, patcher, folder, weight_dtype, load_device, offload_device)

    def serve(self, layer: int) -> None:
        """Make sure hidden layer `layer` can be computed: reload deeper if the decoder was cut before it."""
        if layers_needed(self.llm.total_layers, layer) > len(self.llm.layers):
            fresh = LoadedLLM.load(self.folder, [layer], self.weight_dtype, self.load_device, self.offload_device)
            self.llm, self.patcher = fresh.llm, fresh.patcher

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
    """lidit's auto policy, with ComfyUI judging whether a GPU has bf16 (its flags included)."""
    return compute_dtype(device, lambda d: cpu_has_native_bf16() if mm.is_device_cpu(d) else mm.should_use_bf16(d))


class LIDiTLLMLoader:
    DESCRIPTION = ("Loads a local Hugging Face LLM (a folder under models/LLM) as a frozen prompt encoder. "
                   "ComfyUI moves it to the GPU to encode and offloads it afterwards.")
    CATEGORY = "LI-DiT"
    FUNCTION = "load"
    RETURN_TYPES = ("LIDIT_LLM",)
    RETURN_NAMES = ("llm",)
    OUTPUT_TOOLTIPS = ("The loaded LLM, cut after the deepest hidden layer its encode nodes ask for; one loader "
                       "serves any number of encode nodes.",)

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
        }, "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, llm_name: str):
        try:
            resolve_llm(llm_name)
        except (ValueError, FileNotFoundError) as e:
            return str(e)
        return True

    def load(self, llm_name: str, dtype: str, device: str, prompt: dict | None = None,
             unique_id: str | None = None) -> tuple[LoadedLLM]:
        folder = resolve_llm(llm_name)
        if device == "cpu":
            load_device = offload_device = torch.device("cpu")
        else:
            load_device, offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
        weight_dtype = auto_dtype(load_device) if dtype == "auto" else DTYPES[dtype]
        return (LoadedLLM.load(folder, layers_asked(prompt, unique_id), weight_dtype, load_device, offload_device),)


def layers_asked(prompt: dict | None, node_id: str | None) -> list[int] | None:
    """The hidden layers that the queued graph's nodes ask of loader `node_id`, when every node it
    feeds is an Instructed Encode with a literal layer; None (load every layer) otherwise."""
    if not prompt or node_id is None:
        return None
    layers = []
    for node in prompt.values():
        inputs = node.get("inputs", {})
        if not any(isinstance(v, list) and len(v) == 2 and str(v[0]) == str(node_id) for v in inputs.values()):
            continue
        layer = inputs.get("hidden_layer")
        if node.get("class_type") != "LIDiTInstructedEncode" or not isinstance(layer, int):
            return None
        layers.append(layer)
    return layers or None
