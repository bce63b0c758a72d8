"""ComfyUI and this pack imported into the current process.

For what a server cannot show on a CPU-only machine: a GPU user's precision and memory paths,
simulated with the host's own machinery (`build_lidit` with the dtypes ComfyUI picks for a GPU,
comfy.ops casting, ModelPatcher's partial loading), plus call counting inside a sampling run, and
the host benchmark. Sampling goes through `comfy.sample.sample`, the path KSampler takes.

The pack is imported as the package `comfyui_lidit`, the way ComfyUI imports a custom node folder,
so its relative imports (`..lidit`) resolve inside it.
"""
from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import torch
from harness import REPO_ROOT, find_comfyui_dir

PACK_MODULE = "comfyui_lidit"


def load_pack() -> ModuleType:
    """ComfyUI as `main.py --cpu` sets it up (no argument parsing), then the pack."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    comfy_dir = find_comfyui_dir()
    # ComfyUI ships a regular package `tests`, which would win over this repo's namespace package:
    # bind the name to this repo's first
    importlib.import_module("tests.fixtures_models")
    sys.path.append(str(comfy_dir))
    from comfy.cli_args import args
    args.cpu = True  # read when comfy.model_management is first imported
    import comfy.model_management  # noqa: F401
    # ComfyUI's nodes.py under its own name; the repo root's `nodes` (this pack's) would shadow it
    spec = importlib.util.spec_from_file_location("nodes", comfy_dir / "nodes.py")
    sys.modules["nodes"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["nodes"])
    spec = importlib.util.spec_from_file_location(PACK_MODULE, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = pack
    spec.loader.exec_module(pack)
    return pack


def sub(name: str) -> ModuleType:
    """A module of the loaded pack, e.g. sub('nodes.host_model') or sub('lidit.states')."""
    return importlib.import_module(f"{PACK_MODULE}.{name}")


def load_llms(names: list[str], dtype: str = "fp32") -> list:
    loader = sub("nodes.llm_loader").LIDiTLLMLoader()
    return [loader.load(name, dtype, "default")[0] for name in names]


def conditioning(model, llms: list, text: str) -> list:
    """Instructed Encode per LLM with the checkpoint's template, then Collaborative Fusion."""
    nodes_text, encode = sub("nodes.fusion"), sub("nodes.encode").LIDiTInstructedEncode()
    config = nodes_text.lidit_config_of(model)
    t = config.text
    instruction = "custom" if t.instruction else "none"
    branches = []
    for llm, branch in zip(llms, t.branches):
        (encoded,) = encode.encode(llm, text, instruction, t.instruction, t.system_prompt, t.chat_template,
                                   branch.layer, t.max_tokens)
        branches.append(nodes_text.LIDiTTokenRefiner().route(encoded, -1)[0])
    (cond,) = nodes_text.LIDiTCollaborativeFusion().fuse(model, *branches[:1],
                                                         **{f"branch_{i + 1}": b for i, b in enumerate(branches[1:], 1)})
    return cond


def ksample(model, positive: list, negative: list, seed: int = 0, steps: int | None = None, cfg: float | None = None,
            size: int | None = None, batch: int = 1, sampler: str = "euler", scheduler: str = "simple") -> torch.Tensor:
    """What KSampler runs (comfy.sample.sample), at the checkpoint's defaults unless given; the latent."""
    import comfy.sample

    config = sub("nodes.host_model").lidit_config_of(model)
    side = (size or config.resolution) // sub("nodes.host_model").DOWNSCALE[config.latent_format]
    latent = torch.zeros(batch, config.dit.in_channels, side, side)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps or config.steps, cfg or config.cfg, sampler, scheduler,
                               positive, negative, latent, seed=seed, disable_pbar=True)
