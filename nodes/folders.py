"""Where the pack finds its models: the `LLM` folder key and the pack's bundled folders.

Folders are appended, never inserted first, so a user's extra_model_paths.yaml (applied before
custom nodes load) wins. A name is resolved in registration order, the first folder holding it
wins, exactly as ComfyUI's own `get_full_path` does:
  LLM:               extra_model_paths.yaml entries, <ComfyUI>/models/LLM, <pack>/models/LLM
  LI-DiT checkpoints: the `diffusion_models` folders, then <pack>/checkpoints (key `lidit_checkpoints`)
  LLM pathways:      <ComfyUI>/models/lidit_pathways (key `lidit_pathways`), for LI-DiT From PixArt

The pack's checkpoints get a key of their own: added to `diffusion_models`, they would show up in
the stock "Load Diffusion Model" node, which cannot load them.
"""
from __future__ import annotations

import os
from pathlib import Path

import folder_paths

LLM_KEY = "LLM"
CHECKPOINT_KEY = "lidit_checkpoints"
PATHWAY_KEY = "lidit_pathways"
PACK_DIR = Path(__file__).resolve().parents[1]
PACK_LLM_DIR = PACK_DIR / "models" / "LLM"
PACK_CHECKPOINT_DIR = PACK_DIR / "checkpoints"


def register_model_folders() -> None:
    folder_paths.add_model_folder_path(LLM_KEY, os.path.join(folder_paths.models_dir, "LLM"))
    folder_paths.add_model_folder_path(LLM_KEY, str(PACK_LLM_DIR))
    folder_paths.folder_names_and_paths.setdefault(CHECKPOINT_KEY, ([], folder_paths.supported_pt_extensions))
    folder_paths.add_model_folder_path(CHECKPOINT_KEY, str(PACK_CHECKPOINT_DIR))
    folder_paths.folder_names_and_paths.setdefault(PATHWAY_KEY, ([], folder_paths.supported_pt_extensions))
    folder_paths.add_model_folder_path(PATHWAY_KEY, os.path.join(folder_paths.models_dir, PATHWAY_KEY))


def checkpoint_names() -> list[str]:
    """The LI-DiT Loader's list: diffusion_models first, then the pack's checkpoints, each name once."""
    names = folder_paths.get_filename_list("diffusion_models")
    return names + [n for n in folder_paths.get_filename_list(CHECKPOINT_KEY) if n not in names]


def resolve_checkpoint(name: str) -> Path:
    path = folder_paths.get_full_path("diffusion_models", name) or folder_paths.get_full_path_or_raise(CHECKPOINT_KEY, name)
    return Path(path)


def llm_names() -> list[str]:
    """Every folder directly inside a registered LLM folder that holds a config.json, each name once."""
    names = set()
    for root in folder_paths.get_folder_paths(LLM_KEY):
        if os.path.isdir(root):
            names.update(e.name for e in os.scandir(root)
                         if e.is_dir() and os.path.isfile(os.path.join(e.path, "config.json")))
    return sorted(names)


def child(root: str, name: str, path=os.path) -> str | None:
    """root/name when that is a direct child of root, judged on the joined, normalised path, not on
    the name's spelling: `..`, `a/b`, absolute and drive-relative names (`C:foo`) lead elsewhere.
    `path` is os.path (ntpath on Windows); a folder the user symlinked into root is theirs."""
    base = path.abspath(root)
    joined = path.abspath(path.join(base, name))
    return joined if name and path.dirname(joined) == base and path.basename(joined) == name else None


def resolve_llm(name: str) -> Path:
    """The folder of an LLM name, looked up only inside the registered LLM folders."""
    roots = folder_paths.get_folder_paths(LLM_KEY)
    for root in roots:
        folder = child(root, name)
        if folder is None:
            raise ValueError(f"LLM name {name!r} must be the name of a folder inside models/LLM, not a path")
        if os.path.isfile(os.path.join(folder, "config.json")):
            return Path(folder)
    raise FileNotFoundError(
        f"no LLM folder named {name!r} (with a config.json) in any registered LLM folder: {roots}. "
        f"Put the Hugging Face model folder at models/LLM/{name}/ (scripts/provision_llms.py fetches the "
        f"demo LLMs), or pick an installed LLM.")
