"""Broken and hostile files get errors that name the file, what is wrong and what to do, before
anything is allocated for them."""
from __future__ import annotations

import dataclasses
import io
import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lidit.checkpoint import CheckpointError, CheckpointFile, load_checkpoint, save_checkpoint
from lidit.config import LIDiTConfig, preset
from lidit.llm import load_llm
from lidit.model import LIDiTModel


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "good.safetensors"
    save_checkpoint(path, LIDiTModel(preset("tiny")).init_weights())
    return path


def test_a_truncated_checkpoint_says_it_was_cut_short(checkpoint):
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"good.safetensors is truncated: .*describes \d+ bytes, the file has "
                                              r"\d+\. The download or copy was cut short\. Download or export it again"):
        load_checkpoint(checkpoint)


def test_other_formats_and_absurd_headers_are_not_safetensors(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    (tmp_path / "image.safetensors").write_bytes(png.getvalue())
    (tmp_path / "huge.safetensors").write_bytes((2**60).to_bytes(8, "little") + b"{}" * 8)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name in ("image", "huge", "empty"):
        with pytest.raises(CheckpointError, match=rf"{name}.safetensors is not a safetensors file: .* renamed to "
                                                  r"\.safetensors, or a download cut short"):
            CheckpointFile.open(tmp_path / f"{name}.safetensors")


def test_broken_config_json_in_the_metadata_is_named(checkpoint, tmp_path):
    path = tmp_path / "broken.safetensors"
    save_file({"w": torch.zeros(2)}, path, metadata={"lidit_config": '{"text": {"branches": ['})
    with pytest.raises(CheckpointError, match=r"broken.safetensors: the 'lidit_config' in its metadata is invalid: "
                                              r"JSONDecodeError"):
        CheckpointFile.open(path)


@pytest.mark.parametrize("field, value", [("dit.hidden", 10**9), ("dit.depth", 10**6), ("resolution", -8),
                                          ("text.width", "wide"), ("branch.hidden_size", 0)])
def test_absurd_configs_are_refused_naming_the_field_before_any_model_is_built(tmp_path, monkeypatch, field, value):
    config = preset("tiny").to_dict()
    part, _, key = field.rpartition(".")
    target = {"": config, "dit": config["dit"], "text": config["text"], "branch": config["text"]["branches"][0]}[part]
    target[key] = value
    path = tmp_path / "absurd.safetensors"
    save_file({"w": torch.zeros(2)}, path, metadata={"lidit_config": json.dumps(config)})

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built for an absurd config")
    monkeypatch.setattr(LIDiTModel, "__init__", no_model)
    with pytest.raises(CheckpointError, match=rf"absurd.safetensors: .*config field {field} = .* is out of range"):
        CheckpointFile.open(path)


def test_a_header_that_cannot_fill_its_config_fails_before_allocation(tmp_path):
    """A config within bounds but big (depth 1000) whose file holds a tiny model: the shapes are
    compared on the meta device, so nothing of the big model is ever allocated."""
    cfg = preset("tiny")
    big = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, depth=1000, hidden=4096, heads=32))
    path = tmp_path / "big.safetensors"
    state = {k: v.contiguous() for k, v in LIDiTModel(cfg).state_dict().items()}
    save_file(state, path, metadata={"lidit_config": big.to_json()})
    with pytest.raises(CheckpointError, match="big.safetensors"):
        CheckpointFile.open(path)
    assert LIDiTConfig.from_json(big.to_json()) == big


def test_an_llm_folder_without_tokenizer_files_says_what_to_copy(tiny_llm_dirs, tmp_path):
    folder = shutil.copytree(tiny_llm_dirs["tiny-llama"], tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=r"no-tokenizer has no tokenizer files \(one of tokenizer.json, "
                                                r"tokenizer.model, .*\): copy them from the model's repository"):
        load_llm(folder)
