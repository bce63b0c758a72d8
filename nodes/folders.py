"""Where the pack finds its models: the `LLM` folder key and the pack's bundled folders.

Folders are appended, never inserted first, so a user's extra_model_paths.yaml (applied before
custom nodes load) wins. A name is resolved in registration order, the first folder holding it
wins, exactly as ComfyUI's own `get_full_path` does:
  LLM:              extra_model_paths.yaml entries, <ComfyUI>/models/LLM, <pack>/models/LLM
  diffusion_models: ComfyUI's own folders, extra_model_paths.yaml entries, <pack>/checkpoints
"""
from __future__ import annotations

import os
from pathlib import Path

import folder_paths

LLM_KEY = "LLM"
PACK_DIR = Path(__file__).resolve().parents[1]
PACK_LLM_DIR = PACK_DIR / "models" / "LLM"
PACK_CHECKPOINT_DIR = PACK_DIR / "checkpoints"


def register_model_folders() -> None:
    folder_paths.add_model_folder_path(LLM_KEY, os.path.join(folder_paths.models_dir, "LLM"))
    folder_paths.add_model_folder_path(LLM_KEY, str(PACK_LLM_DIR))
    folder_paths.add_model_folder_path("diffusion_models", str(PACK_CHECKPOINT_DIR))


def llm_names() -> list[str]:
    """Every folder directly inside a registered LLM folder that holds a config.json, each name once."""
    names = set()
    for root in folder_paths.get_folder_paths(LLM_KEY):
        if os.path.isdir(root):
            names.update(e.name for e in os.scandir(root)
                         if e.is_dir() and os.path.isfile(os.path.join(e.path, "config.json")))
    return sorted(names)


def resolve_llm(name: str) -> Path:
    """The folder of an LLM name, looked up only inside the registered LLM folders."""
    if not name or name in (".", "..") or os.path.isabs(name) or "/" in name or "\\" in name:
        raise ValueError(f"LLM name {name!r} must be the name of a folder inside models/LLM, not a path")
    roots = folder_paths.get_folder_paths(LLM_KEY)
    for root in roots:
        folder = Path(root) / name
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(
        f"no LLM folder named {name!r} (with a config.json) in any registered LLM folder: {roots}. "
        f"Put the Hugging Face model folder at models/LLM/{name}/ (scripts/provision_llms.py fetches the "
        f"demo LLMs), or pick an installed LLM.")
