"""An LI-DiT LoRA through ComfyUI's stock LoraLoaderModelOnly: every key maps (no "lora key not
loaded"), strength 0 gives the base image bit for bit, strength 1 changes it."""
import lidit_assets as assets
import numpy as np
import torch
from test_nodes import DIT, SAMPLER, SAVE, paper, png_array

from lidit.checkpoint import load_checkpoint
from lidit.lora import LoRAConfig, add_lora, save_lora

NAME = "lidit-test-lora.safetensors"


def make_lora(lidit_assets, folder) -> None:
    """Adapters on every DiT block and refiner of the checkpoint the workflow loads, as if trained."""
    base = lidit_assets.checkpoints[assets.DEMO]
    model = load_checkpoint(base)
    add_lora(model, LoRAConfig(base=str(base), rank=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".up.weight"):
                p.normal_(0, 0.2)
    save_lora(folder / NAME, model)


def test_lora_round_trip_through_the_stock_loader(comfy_server, comfy_models_dir, lidit_assets) -> None:
    make_lora(lidit_assets, comfy_models_dir / "loras")
    images = {}
    for strength in (None, 0.0, 1.0):
        graph = paper(steps=3)
        graph[SAMPLER]["inputs"]["seed"] = 4242
        if strength is not None:
            graph["50"] = {"class_type": "LoraLoaderModelOnly",
                           "inputs": {"model": [DIT, 0], "lora_name": NAME, "strength_model": strength}}
            graph[SAMPLER]["inputs"]["model"] = ["50", 0]
        mark = comfy_server.log_size()
        _, entry = comfy_server.run(graph, timeout=120)
        assert "lora key not loaded" not in comfy_server.log_text(since=mark)
        [png] = comfy_server.output_images(entry, node_id=SAVE)
        images[strength] = png_array(png)
    assert np.array_equal(images[0.0], images[None])
    assert np.abs(images[1.0] - images[None]).max() > 8
