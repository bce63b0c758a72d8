"""LI-DiT Sampler: the stock KSampler with the checkpoint's own defaults and an empty latent of
the right shape, so a graph needs no latent node and no knowledge of the training resolution."""
from __future__ import annotations

import math

import torch

import comfy.model_management as mm
import comfy.samplers

from nodes import MAX_RESOLUTION, common_ksampler  # ComfyUI's nodes.py, not this pack's package

from ..lidit.config import LIDiTConfig
from .host_model import DOWNSCALE, lidit_config_of

ASPECTS = ["1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "21:9", "9:21"]


def image_size(config: LIDiTConfig, aspect: str, width: int = 0, height: int = 0) -> tuple[int, int]:
    """Pixels (width, height): the aspect at the training area, snapped to whole patches; a given
    width or height wins, and a lone one fixes the other through the aspect."""
    factor = DOWNSCALE[config.latent_format]
    align = factor * config.dit.patch
    aw, ah = (int(v) for v in aspect.split(":"))

    def snap(v: float, step: int = align) -> int:
        return max(step, round(v / step) * step)

    if width and height:
        return snap(width, factor), snap(height, factor)
    if width:
        return snap(width, factor), snap(width * ah / aw)
    if height:
        return snap(height * aw / ah), snap(height, factor)
    scale = config.resolution / math.sqrt(aw * ah)
    return snap(aw * scale), snap(ah * scale)


class LIDiTSampler:
    DESCRIPTION = ("Samples an image with ComfyUI's samplers (progress, previews and interrupt work as in "
                   "KSampler), using the checkpoint's recommended steps, cfg and resolution by default.")
    CATEGORY = "LI-DiT"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The denoised latent (for pixel-space checkpoints: the image; decode with VAELoader "
                       "'pixel_space' + VAE Decode).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "From the LI-DiT Loader (model patches such as ModelSamplingSD3 work)."}),
            "positive": ("CONDITIONING", {"tooltip": "From LI-DiT Collaborative Fusion: what the image shows."}),
            "negative": ("CONDITIONING", {"tooltip": "From LI-DiT Collaborative Fusion, usually of an empty prompt."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "The random seed of the initial noise."}),
            "steps": ("INT", {"default": 0, "min": 0, "max": 10000,
                              "tooltip": "Sampling steps; 0 uses the checkpoint's recommendation."}),
            "cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale; 0 uses the checkpoint's recommendation."}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "euler",
                                                                "tooltip": "The sampling algorithm."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "simple",
                                                               "tooltip": "How the noise levels are spaced."}),
            "resolution": (ASPECTS, {"default": "1:1",
                                     "tooltip": "Aspect ratio at the checkpoint's training resolution "
                                                "(used unless width and height are both set)."}),
            "width": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8,
                              "tooltip": "Image width in pixels; 0 follows the resolution preset."}),
            "height": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8,
                               "tooltip": "Image height in pixels; 0 follows the resolution preset."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "Images per run."}),
        }}

    def sample(self, model, positive, negative, seed: int, steps: int, cfg: float, sampler_name: str,
               scheduler: str, resolution: str, width: int, height: int, batch_size: int) -> tuple[dict]:
        config = lidit_config_of(model)
        w, h = image_size(config, resolution, width, height)
        factor = DOWNSCALE[config.latent_format]
        shape = (batch_size, config.dit.in_channels, h // factor, w // factor)
        model.model.check_size(shape, model.load_device)  # before allocating a latent that could never be sampled
        latent = torch.zeros(shape, device=mm.intermediate_device())
        return common_ksampler(model, seed, steps or config.steps, cfg or config.cfg, sampler_name, scheduler,
                               positive, negative, {"samples": latent})
