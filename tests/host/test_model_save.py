"""A LoRA baked into one file with stock nodes (LoraLoaderModelOnly -> ModelSave) loads in the LI-DiT
Loader and draws the same pixels as the LoRA graph did; the file is plain safetensors that says
what it is (the LI-DiT config inside), and nothing is unpickled. The same for a merge of two
checkpoints (ModelMergeSimple -> ModelSave), in-process."""
import json
import shutil

import inproc
import numpy as np
import torch
from test_lora_loader import NAME, make_lora
from test_nodes import DIT, SAMPLER, SAVE, paper, png_array

from lidit.checkpoint import STOCK_CONFIG_KEY, STOCK_PREFIX, read_header
from tests.fixtures_models import build_tiny_checkpoint

PREFIX = "diffusion_models/lidit-baked"


def test_a_lora_baked_with_modelsave_reloads_to_identical_pixels(comfy_server, comfy_models_dir, lidit_assets) -> None:
    make_lora(lidit_assets, comfy_models_dir / "loras")
    graph = paper(steps=3)
    graph[SAMPLER]["inputs"]["seed"] = 777
    graph["50"] = {"class_type": "LoraLoaderModelOnly",
                   "inputs": {"model": [DIT, 0], "lora_name": NAME, "strength_model": 1.0}}
    graph["51"] = {"class_type": "ModelSave", "inputs": {"model": ["50", 0], "filename_prefix": PREFIX}}
    graph[SAMPLER]["inputs"]["model"] = ["50", 0]
    _, entry = comfy_server.run(graph, timeout=180)
    [png] = comfy_server.output_images(entry, node_id=SAVE)
    with_lora = png_array(png)
    [saved] = sorted((comfy_server.output_dir / "diffusion_models").glob("lidit-baked_*.safetensors"))[-1:]

    _, header, metadata = read_header(saved)
    assert all(k.startswith(STOCK_PREFIX) for k in header if k != STOCK_CONFIG_KEY)
    assert header[STOCK_CONFIG_KEY]["dtype"] == "U8"
    assert "prompt" in metadata and json.loads(metadata["prompt"])["51"]["class_type"] == "ModelSave"

    name = "lidit-baked-lora.safetensors"
    shutil.copy(saved, comfy_models_dir / "diffusion_models" / name)
    baked = paper(steps=3)
    baked[SAMPLER]["inputs"]["seed"] = 777
    baked[DIT]["inputs"]["ckpt_name"] = name
    _, entry = comfy_server.run(baked, timeout=180)
    [png] = comfy_server.output_images(entry, node_id=SAVE)
    assert np.array_equal(png_array(png), with_lora)

    plain = paper(steps=3)
    plain[SAMPLER]["inputs"]["seed"] = 777
    _, entry = comfy_server.run(plain, timeout=180)
    [png] = comfy_server.output_images(entry, node_id=SAVE)
    assert np.abs(png_array(png) - with_lora).max() > 8  # the LoRA is in the file, not lost on the way


def test_a_merge_saved_with_modelsave_reloads_to_identical_pixels(tiny_pack_assets, tmp_path) -> None:
    """ModelMergeSimple of two LI-DiT MODELs, saved by the stock ModelSave, reloads in the LI-DiT
    Loader's path to the latent the merged MODEL sampled (bitwise), which neither parent samples."""
    from comfy_extras.nodes_model_merging import ModelMergeSimple, ModelSave

    host = inproc.sub("nodes.host_model")
    first = host.build_lidit(str(tiny_pack_assets["checkpoint"]), torch.float32, None, torch.device("cpu"))
    other = build_tiny_checkpoint(tmp_path / "other.safetensors", host.lidit_config_of(first), seed=8)
    second = host.build_lidit(str(other), torch.float32, None, torch.device("cpu"))
    (merged,) = ModelMergeSimple().merge(first, second, 0.4)
    llms = inproc.load_llms(tiny_pack_assets["llms"])
    pos, neg = (inproc.conditioning(first, llms, text) for text in ("a red circle and a blue square", ""))

    def draw(model) -> torch.Tensor:
        return inproc.ksample(model, pos, neg, steps=3, cfg=3.0, seed=5)
    want = draw(merged)
    save = ModelSave()
    save.output_dir = str(tmp_path)
    save.save(merged, "diffusion_models/lidit-merged")
    [saved] = (tmp_path / "diffusion_models").glob("lidit-merged_*.safetensors")
    torch.testing.assert_close(draw(host.load_lidit(str(saved), "fp32")), want, rtol=0, atol=0)
    assert all((draw(parent) - want).abs().max() > 1e-3 for parent in (first, second))
