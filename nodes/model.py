"""LI-DiT Loader and the adapter that makes an LI-DiT checkpoint a standard ComfyUI MODEL.

The MODEL behaves like any core model (KSampler, ModelSamplingSD3, CFGGuider, img2img all
work): the config picks the sampling type (eps, v or flow with a shift) and the latent format;
the network runs lidit's text pathway (refiners + collaborative refiner) at every step, where
the timestep is known, and then the DiT.
"""
from __future__ import annotations

import logging
import os

import torch
from safetensors.torch import load_file

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.model_sampling
import comfy.supported_models_base
import comfy.utils
import folder_paths

from ..lidit.checkpoint import CheckpointError, read_config, validate_state_dict
from ..lidit.config import LIDiTConfig
from ..lidit.model import LIDiTModel
from . import conditioning
from .conditioning import LAYOUT, MASK, PROMPT

LATENT_FORMATS = {"pixel": comfy.latent_formats.ChromaRadiance, "sd3": comfy.latent_formats.SD3,
                  "flux": comfy.latent_formats.Flux}
#: image pixels per latent pixel, per latent format
DOWNSCALE = {"pixel": 1, "sd3": 8, "flux": 8}
MODEL_TYPES = {"flow": comfy.model_base.ModelType.FLOW, "eps": comfy.model_base.ModelType.EPS,
               "v": comfy.model_base.ModelType.V_PREDICTION}
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LIDiTNet(LIDiTModel):
    """lidit's model with the `diffusion_model(x, timesteps, context, **conds)` call ComfyUI makes.

    A subclass rather than a wrapper, so its weight names are the checkpoint's own (`text.*`,
    `dit.*`) for ComfyUI's patching too.
    """

    def __init__(self, lidit_config: LIDiTConfig, dtype=None, device=None, operations=None) -> None:
        super().__init__(lidit_config, ops=operations, dtype=dtype, device=device)
        self.dtype = dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = conditioning.unpack(context, kwargs[MASK], kwargs[PROMPT], kwargs[LAYOUT])
        return super().forward(x, timesteps, texts)


class LIDiTBaseModel(comfy.model_base.BaseModel):
    def __init__(self, model_config: "LIDiTModelConfig", model_type, device=None) -> None:
        super().__init__(model_config, model_type, device=device, unet_model=LIDiTNet)

    @property
    def lidit_config(self) -> LIDiTConfig:
        return self.model_config.lidit_config

    def extra_conds(self, **kwargs):
        if LAYOUT not in kwargs:
            raise ValueError("LI-DiT needs its conditioning from an LI-DiT Collaborative Fusion node; this one "
                             "came from elsewhere (e.g. CLIPTextEncode)")
        out = super().extra_conds(**kwargs)
        # CONDRegular, not CONDCrossAttn: padding by repetition would misalign the masks
        out["c_crossattn"] = comfy.conds.CONDRegular(kwargs["cross_attn"])
        # as integers: the host casts floating (and bool) conds to the model dtype
        out[MASK] = comfy.conds.CONDRegular(kwargs[MASK].long())
        out[PROMPT] = comfy.conds.CONDRegular(kwargs[PROMPT].long())
        out[LAYOUT] = comfy.conds.CONDConstant(kwargs[LAYOUT])
        return out

    def process_timestep(self, timestep: torch.Tensor, **kwargs) -> torch.Tensor:
        """ComfyUI passes its model_sampling's timestep (possibly patched, e.g. by ModelSamplingSD3);
        lidit wants t in [0, 1]: the flow time (= sigma), or the DDPM index / 1000."""
        sampling = self.model_sampling
        if isinstance(sampling, comfy.model_sampling.CONST):  # flow: timestep = sigma * multiplier (Flux: sigma)
            return timestep / getattr(sampling, "multiplier", 1.0)
        return timestep / sampling.num_timesteps


class LIDiTModelConfig(comfy.supported_models_base.BASE):
    unet_config = {}
    unet_extra_config = {}  # BASE would otherwise inject num_heads and friends into the network's kwargs
    # The host casts the LLM states to this dtype, and they exceed float16's range (Gemma-3's BOS ~1e5)
    supported_inference_dtypes = [torch.bfloat16, torch.float32]

    def __init__(self, lidit_config: LIDiTConfig) -> None:
        self.lidit_config = lidit_config
        self.latent_format = LATENT_FORMATS[lidit_config.latent_format]
        self.sampling_settings = {"shift": lidit_config.shift, "multiplier": 1000} if lidit_config.prediction == "flow" else {}
        super().__init__({"lidit_config": lidit_config})

    def get_model(self, state_dict=None, prefix="", device=None) -> LIDiTBaseModel:
        return LIDiTBaseModel(self, MODEL_TYPES[self.lidit_config.prediction], device=device)


def lidit_config_of(model: comfy.model_patcher.ModelPatcher) -> LIDiTConfig:
    config = getattr(getattr(model, "model", None), "lidit_config", None)
    if config is None:
        raise ValueError(f"this MODEL is not an LI-DiT model ({type(getattr(model, 'model', model)).__name__}): "
                         "load it with the LI-DiT Loader")
    return config


def load_lidit(path: str, weight_dtype: str = "default") -> comfy.model_patcher.ModelPatcher:
    """Build the MODEL the checkpoint's own config describes and fill it; nothing is unpickled."""
    name = os.path.basename(path)
    if not path.endswith((".safetensors", ".sft")):
        raise CheckpointError(f"{name}: LI-DiT checkpoints are .safetensors files")
    config = read_config(path)
    channels = LATENT_FORMATS[config.latent_format].latent_channels
    if config.dit.in_channels != channels:
        raise CheckpointError(f"{name}: its config says latent_format {config.latent_format!r} ({channels} channels) "
                              f"but dit.in_channels = {config.dit.in_channels}")
    state = load_file(path)
    model_config = LIDiTModelConfig(config)
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    dtype = WEIGHT_DTYPES.get(weight_dtype) or mm.unet_dtype(
        model_params=comfy.utils.calculate_parameters(state), supported_dtypes=model_config.supported_inference_dtypes,
        weight_dtype=comfy.utils.weight_dtype(state))
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes))
    model = model_config.get_model(device=offload_device)
    validate_state_dict(model.diffusion_model, state, name)
    model.diffusion_model.load_state_dict(state)
    logging.info("LI-DiT: loaded %s (%s, %s latents, %d LLM branches: %s)", name, config.prediction,
                 config.latent_format, len(config.text.branches),
                 ", ".join(f"{b.name} ({b.hidden_size})" for b in config.text.branches))
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


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
            "ckpt_name": (folder_paths.get_filename_list("diffusion_models"), {
                "tooltip": "An LI-DiT checkpoint in models/diffusion_models (or the pack's checkpoints folder)."}),
            "weight_dtype": (["default", *WEIGHT_DTYPES], {
                "default": "default",
                "tooltip": "Weight precision; default lets ComfyUI pick for your device."}),
        }}

    def load(self, ckpt_name: str, weight_dtype: str) -> tuple[comfy.model_patcher.ModelPatcher]:
        return (load_lidit(folder_paths.get_full_path_or_raise("diffusion_models", ckpt_name), weight_dtype),)
