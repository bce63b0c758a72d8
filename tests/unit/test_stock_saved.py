"""Files written by ComfyUI's stock ModelSave (weights under `model.diffusion_model.`, the config as
a uint8 tensor of its JSON) read as LI-DiT checkpoints, with nothing unpickled; stock files that
are not LI-DiT, or hold more than the model, get errors that say what to do."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lidit.checkpoint import (
    STOCK_CONFIG_KEY,
    STOCK_PREFIX,
    CheckpointError,
    CheckpointFile,
    load_checkpoint,
    read_config,
)
from lidit.config import preset
from lidit.model import LIDiTModel


def stock_file(path, model: LIDiTModel, config: bool = True, extra: dict | None = None) -> None:
    """What comfy.sd.save_checkpoint writes for an LI-DiT MODEL (see nodes/host_model.py)."""
    tensors = {STOCK_PREFIX + k: v.contiguous() for k, v in model.state_dict().items()}
    if config:
        tensors[STOCK_CONFIG_KEY] = torch.frombuffer(bytearray(model.config.to_json().encode()), dtype=torch.uint8)
    save_file({**tensors, **(extra or {})}, path, metadata={"prompt": "{}"})


@pytest.fixture
def model() -> LIDiTModel:
    torch.manual_seed(0)
    return LIDiTModel(preset("tiny")).init_weights()


def test_a_stock_saved_model_loads_with_its_weights_and_config(tmp_path, model):
    path = tmp_path / "ComfyUI_00001_.safetensors"
    stock_file(path, model, extra={"v_pred": torch.tensor([])})
    assert read_config(path) == model.config
    assert CheckpointFile.open(path).config == model.config
    loaded = load_checkpoint(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_stock_saved_file_without_the_config_names_the_way_to_save(tmp_path, model):
    path = tmp_path / "sdxl.safetensors"
    stock_file(path, model, config=False)
    with pytest.raises(CheckpointError, match=r"sdxl.safetensors was saved by ComfyUI \(ModelSave or CheckpointSave.*"
                                              r"not LI-DiT.*feed ModelSave a MODEL that comes from the LI-DiT Loader"):
        CheckpointFile.open(path)


def test_a_stock_checkpoint_with_clip_and_vae_is_refused_naming_modelsave(tmp_path, model):
    path = tmp_path / "all.safetensors"
    stock_file(path, model, extra={"first_stage_model.decoder.w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"holds more than an LI-DiT model \(e.g. 'first_stage_model.decoder.w'\)"
                                              r".*with ModelSave rather than CheckpointSave"):
        CheckpointFile.open(path)


def test_a_config_tensor_of_another_dtype_is_refused(tmp_path, model):
    path = tmp_path / "odd.safetensors"
    stock_file(path, model, config=False, extra={STOCK_CONFIG_KEY: torch.zeros(4)})
    with pytest.raises(CheckpointError, match=r"odd.safetensors: its 'lidit_config' tensor is not the UTF-8 bytes"):
        CheckpointFile.open(path)
