"""Test-only ComfyUI custom-node module (it defines no nodes): a tiny PixArt that the stock
UNETLoader can load.

ComfyUI detects a PixArt from its keys and builds it at PixArt's fixed sizes (width 1152, 16 heads,
T5's 4096 caption channels), whatever the file holds. For a file whose patch embedding is narrower,
this takes the width and caption channels from the weights and the head size of
tests/fixtures_models.py TINY_PIXART; any other file loads as usual. The test server loads this
folder as a custom_nodes path (tests/host/harness.py).
"""
from __future__ import annotations

import functools

import comfy.model_detection

HEAD_SIZE = 12  # TINY_PIXART's 48 / 4 heads


def install() -> None:
    """Wrap comfy.model_detection.detect_unet_config (what UNETLoader's detection calls); idempotent."""
    original = comfy.model_detection.detect_unet_config
    if getattr(original, "lidit_tiny", False):
        return

    @functools.wraps(original)
    def detect(state_dict, key_prefix, *args, **kwargs):
        config = original(state_dict, key_prefix, *args, **kwargs)
        embed = state_dict.get(f"{key_prefix}x_embedder.proj.weight")
        if config and str(config.get("image_model", "")).startswith("pixart") and embed is not None \
                and embed.shape[0] != config["hidden_size"]:
            config.update(hidden_size=embed.shape[0], num_heads=embed.shape[0] // HEAD_SIZE,
                          caption_channels=state_dict[f"{key_prefix}y_embedder.y_proj.fc1.weight"].shape[1])
        return config

    detect.lidit_tiny = True
    comfy.model_detection.detect_unet_config = detect


install()
NODE_CLASS_MAPPINGS: dict = {}
