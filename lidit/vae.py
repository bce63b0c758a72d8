"""Between model space and pixels: a local VAE for latent models, and decoding to images.

diffusers is imported only here and only when a latent model asks for it: pixel models need
nothing beyond torch.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import LIDiTConfig


def load_vae(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A local diffusers AutoencoderKL folder."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError("latent models encode and decode images with a diffusers AutoencoderKL: install the "
                          "`diffusers` package (pip install diffusers), or use a pixel model (latent_format "
                          "'pixel')") from None
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers AutoencoderKL folder (no config.json)")
    return AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=dtype).to(device).eval()


def to_pixels(x: torch.Tensor, config: LIDiTConfig, vae_dir: str | os.PathLike | None) -> torch.Tensor:
    """(B, C, H, W) model space -> (B, 3, H', W') in [0, 1]."""
    if config.latent_format != "pixel":
        if not vae_dir:
            raise ValueError(f"this checkpoint makes {config.latent_format} latents: pass a diffusers "
                             "AutoencoderKL folder to decode them (--vae)")
        vae = load_vae(vae_dir)
        scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
        with torch.no_grad():
            x = vae.decode(x / scale + shift).sample
    return ((x.float() + 1) / 2).clamp(0, 1)
