"""LI-DiT From PixArt: a PixArt MODEL that stock loaders loaded, joined with an LLM pathway file.

The PixArt-alpha or -Sigma backbone is converted in memory (`lidit.pixart`): the result computes
what PixArt computes given the same caption tokens, and the pathway file (token refiners,
collaborative refiner, cross-attention K/V and the null context, trained for that backbone) feeds it
from local LLMs instead of T5. The new MODEL keeps the PixArt MODEL's weight and compute dtypes and
devices. LoRAs made for PixArt's T5 conditioning do not carry over; apply LI-DiT LoRAs after this
node.
"""
from __future__ import annotations

import logging

import comfy.model_patcher
import folder_paths
from comfy.ldm.pixart.pixartms import PixArtMS

from ..lidit.pixart import join_pathway
from .folders import PATHWAY_KEY
from .host_model import new_lidit


class LIDiTFromPixArt:
    DESCRIPTION = ("Turns a PixArt-alpha or PixArt-Sigma MODEL (from Load Diffusion Model or Load Checkpoint) into an "
                   "LI-DiT MODEL, with the LLM pathway from a pathway file: the same backbone, prompted by local LLMs "
                   "through LI-DiT's refiners instead of T5.")
    CATEGORY = "LI-DiT"
    FUNCTION = "convert"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The LI-DiT model, for LI-DiT Collaborative Fusion and the sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A PixArt-alpha or PixArt-Sigma model, without KV compression."}),
            "pathway_name": (folder_paths.get_filename_list(PATHWAY_KEY), {
                "tooltip": "An LLM pathway file in models/lidit_pathways (python -m lidit convert pixart ... --pathway, "
                           "then trained)."}),
        }}

    def convert(self, model: comfy.model_patcher.ModelPatcher, pathway_name: str) -> tuple[comfy.model_patcher.ModelPatcher]:
        net = getattr(model.model, "diffusion_model", None)
        if not isinstance(net, PixArtMS):
            raise ValueError(f"LI-DiT From PixArt needs a PixArt-alpha or -Sigma MODEL; this one is a "
                             f"{type(net).__name__}. Load PixArt with Load Diffusion Model or Load Checkpoint.")
        path = folder_paths.get_full_path_or_raise(PATHWAY_KEY, pathway_name)
        config, tensors = join_pathway(net.state_dict(), path)
        patcher = new_lidit(config, model.model.get_dtype(), model.model.manual_cast_dtype, model.load_device)
        patcher.model.diffusion_model.load_state_dict(tensors)
        logging.info("LI-DiT: %s joined with PixArt's backbone (%d blocks) for %s", pathway_name, config.dit.depth,
                     ", ".join(b.name for b in config.text.branches))
        return (patcher,)
