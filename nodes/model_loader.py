"""LI-DiT Loader: a checkpoint from the model folders as a standard MODEL (see host_model)."""
from __future__ import annotations

import comfy.model_patcher

from .folders import checkpoint_names, resolve_checkpoint
from .host_model import WEIGHT_DTYPES, load_lidit


class LIDiTLoader:
    DESCRIPTION = ("Loads an LI-DiT checkpoint (.safetensors with its config inside) as a standard MODEL: "
                   "it works with KSampler, ModelSamplingSD3, CFGGuider and the other stock sampling nodes.")
    CATEGORY = "LI-DiT"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The LI-DiT diffusion model, text refiners included.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (checkpoint_names(), {
                "tooltip": "An LI-DiT checkpoint in models/diffusion_models (or the pack's checkpoints folder)."}),
            "weight_dtype": (["default", *WEIGHT_DTYPES], {
                "default": "default",
                "tooltip": "Weight precision. default: as ComfyUI picks for your GPU (bf16, or fp16 where the GPU has "
                           "no bf16); on CPUs with native bf16 (AVX512-BF16 or AMX) bf16, elsewhere on CPU fp32. "
                           "fp8_*: weights stored in 8 bits and computed in bf16/fp16 (fp32 on CPUs without bf16); "
                           "_fast uses fp8 matmuls where the GPU has them."}),
        }}

    def load(self, ckpt_name: str, weight_dtype: str) -> tuple[comfy.model_patcher.ModelPatcher]:
        return (load_lidit(str(resolve_checkpoint(ckpt_name)), weight_dtype),)
