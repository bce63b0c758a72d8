"""The models the workflows name, for host and browser tests: tiny random ones by default.

The workflows use the real demo names (`SmolLM2-135M-Instruct`, `gemma-3-270m`,
`lidit-demo.safetensors`). Two modes, chosen by ``$LIDIT_TEST_ASSETS``:

- ``tiny`` (default): tiny random LLMs and checkpoints under those names are written into the
  test server's own model folders. These are registered (by the harness's
  extra_model_paths.yaml) *before* the pack appends its bundled ``models/LLM`` and
  ``checkpoints/``, and names resolve to the first folder that holds them, so the tiny models
  win even when the real demo assets are installed.
- ``real``: nothing is written under the demo names; they resolve to the pack's bundled
  ``models/LLM`` (scripts/provision_llms.py) and ``checkpoints/lidit-demo.safetensors``.

Either way, test-only checkpoints (eps, v, ...) are built tiny for whatever LLMs are in use,
and so is the one-LLM demo checkpoint when the pack has none.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import inproc
import torch
from harness import REPO_ROOT
from safetensors.torch import save_file

from lidit.checkpoint import read_config
from lidit.config import LIDiTConfig, LLMBranch
from lidit.pixart import convert, is_pathway_key, read_pixart, save_pathway
from tests.fixtures_models import (
    TINY_PIXART,
    TINY_QWEN3,
    build_tiny_checkpoint,
    build_tiny_llm,
    build_tiny_pixart,
    build_tiny_qwen3_te,
    llm_branch,
    tiny_config,
)

SMOL, GEMMA = "SmolLM2-135M-Instruct", "gemma-3-270m"
#: name -> (arch, hidden, chat template) of the tiny stand-in
TINY_LLMS = {SMOL: ("llama", 64, True), GEMMA: ("gemma3", 48, False)}
DEMO = "lidit-demo.safetensors"
ONE_LLM = "lidit-demo-smollm2.safetensors"
EMOJI = "lidit-emoji.safetensors"  # workflows/lidit_emoji.json: the demo's two LLMs at 32 px
EPS, V = "lidit-test-eps.safetensors", "lidit-test-v.safetensors"
SD3 = "lidit-test-sd3.safetensors"  # 16-channel latents at 1/8 size
#: workflows/lidit_comfy_text_encoder.json: Comfy-Org's Z-Image text encoder file, and a checkpoint
#: trained on it (none is published: both are tiny in every mode; the server makes ComfyUI's Qwen3 tiny)
QWEN3_TE, QWEN3_CKPT = "qwen_3_4b.safetensors", "lidit-qwen3-4b.safetensors"
#: workflows/lidit_pixart.json: PixArt-Sigma as UNETLoader reads it, a pathway file for it, and an SDXL VAE
#: (tiny in every mode: a random PixArt, and TAESD's architecture for the VAE)
PIXART, PATHWAY = "PixArt-Sigma-XL-2-1024-MS.safetensors", "lidit-pathway-pixart-sigma.safetensors"
SDXL_VAE = "sdxl_vae.safetensors"
PACK_LLM_DIR = REPO_ROOT / "models" / "LLM"
PACK_CHECKPOINT_DIR = REPO_ROOT / "checkpoints"


@dataclass
class Assets:
    mode: str
    llm_dirs: dict[str, Path] = field(default_factory=dict)
    checkpoints: dict[str, Path] = field(default_factory=dict)

    def config(self, ckpt_name: str) -> LIDiTConfig:
        return read_config(self.checkpoints[ckpt_name])


def mode() -> str:
    value = os.environ.get("LIDIT_TEST_ASSETS", "tiny")
    if value not in ("tiny", "real"):
        raise ValueError(f"LIDIT_TEST_ASSETS must be 'tiny' or 'real', got {value!r}")
    return value


def provision(models_dir: Path) -> Assets:
    """Write what is missing into ``models_dir/<key>/`` (idempotent: a second call reuses the files)."""
    torch.set_num_threads(1)  # tiny models; the machine is shared
    assets = Assets(mode())
    llm_root, ckpt_root = models_dir / "LLM", models_dir / "diffusion_models"
    for name, (arch, hidden, chat) in TINY_LLMS.items():
        if assets.mode == "real":
            folder = PACK_LLM_DIR / name
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"LIDIT_TEST_ASSETS=real needs {folder} (run scripts/provision_llms.py)")
        else:
            folder = llm_root / name
            if not (folder / "config.json").is_file():
                build_tiny_llm(folder, arch, hidden, chat)
        assets.llm_dirs[name] = folder
    smol, gemma = (llm_branch(assets.llm_dirs[n]) for n in (SMOL, GEMMA))

    def checkpoint(name: str, config: LIDiTConfig, seed: int, real_ok: bool = False) -> None:
        bundled = PACK_CHECKPOINT_DIR / name
        if assets.mode == "real" and real_ok and bundled.is_file():
            assets.checkpoints[name] = bundled
            return
        if assets.mode == "real" and name == DEMO:
            raise FileNotFoundError(f"LIDIT_TEST_ASSETS=real needs {bundled}")
        path = ckpt_root / name
        if not path.is_file():
            build_tiny_checkpoint(path, config, seed)
        assets.checkpoints[name] = path

    checkpoint(DEMO, tiny_config([smol, gemma]), seed=1, real_ok=True)
    checkpoint(ONE_LLM, tiny_config([smol]), seed=2, real_ok=True)
    checkpoint(EMOJI, dataclasses.replace(tiny_config([smol, gemma]), resolution=32), seed=7, real_ok=True)
    checkpoint(EPS, tiny_config([smol, gemma], prediction="eps"), seed=3)
    checkpoint(V, tiny_config([smol, gemma], prediction="v"), seed=4)
    te = models_dir / "text_encoders" / QWEN3_TE
    if not te.is_file():
        build_tiny_qwen3_te(te)
    checkpoint(QWEN3_CKPT, tiny_config([LLMBranch("qwen3_4b", TINY_QWEN3["hidden"], -3)]), seed=6)
    flow = tiny_config([smol, gemma])
    checkpoint(SD3, dataclasses.replace(flow, latent_format="sd3", dit=dataclasses.replace(flow.dit, in_channels=16, patch=2)),
               seed=5)
    pixart(models_dir, assets, [smol, gemma])
    return assets


def pixart(models_dir: Path, assets: Assets, branches: list[LLMBranch]) -> None:
    """The tiny PixArt-Sigma, a pathway for it (trained at 384 px: PixArt's table needs more than 256),
    and a TAESD-architecture SDXL VAE."""
    source = models_dir / "diffusion_models" / PIXART
    if not source.is_file():
        build_tiny_pixart(source)
    path = models_dir / "lidit_pathways" / PATHWAY
    if not path.is_file():
        model = convert(read_pixart(source), branches, heads=TINY_PIXART["heads"], resolution=384)
        with torch.no_grad():  # open the fresh refiners' gates, as build_tiny_checkpoint does
            for name, p in model.named_parameters():
                if is_pathway_key(name):
                    p.add_(torch.randn_like(p) * 0.05)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_pathway(path, model)
    assets.checkpoints[PATHWAY] = path
    vae = models_dir / "vae" / SDXL_VAE
    if not vae.is_file():
        inproc.load_pack()  # ComfyUI on the import path
        from comfy.taesd.taesd import TAESD

        torch.manual_seed(0)
        vae.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in TAESD(latent_channels=4).state_dict().items()}, vae)
