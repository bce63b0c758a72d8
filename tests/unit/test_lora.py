"""LoRA on an existing checkpoint: a fresh adapter changes nothing, training moves only the
adapters, and the export carries ComfyUI's keys (the host ring applies it with the stock loader)."""
from __future__ import annotations

import torch
from safetensors import safe_open

from lidit.checkpoint import load_checkpoint
from lidit.config import preset
from lidit.lora import LoRAConfig, LoRALinear, add_lora, save_lora
from lidit.model import LIDiTModel
from lidit.states import TextStates
from tests.fixtures_models import build_tiny_checkpoint
from tests.unit.test_train import config, quiet_train


def texts(config, batch=1):
    g = torch.Generator().manual_seed(0)
    return [TextStates(torch.randn(batch, 6, b.hidden_size, generator=g), torch.ones(batch, 6, dtype=torch.bool),
                       torch.tensor([[False, False, True, True, True, True]] * batch)) for b in config.text.branches]


def test_a_fresh_adapter_is_the_identity_and_only_adapters_train():
    torch.manual_seed(0)
    model = LIDiTModel(preset("tiny")).init_weights()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    x, t, text = torch.randn(1, 3, 8, 8), torch.tensor([0.5]), texts(model.config)
    before = model(x, t, text)
    wrapped = add_lora(model, LoRAConfig(base="-", rank=4, targets=("dit.blocks", "text.refiners")))
    assert wrapped and all(p.startswith(("dit.blocks", "text.refiners")) for p in wrapped)
    assert not any(p.startswith("text.collab") for p in wrapped)
    torch.testing.assert_close(model(x, t, text), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".down.weight", ".up.weight")) for n in trainable)


def test_export_uses_comfyuis_generic_lora_keys(tmp_path):
    model = LIDiTModel(preset("tiny")).init_weights()
    add_lora(model, LoRAConfig(base="-", rank=2, alpha=4.0, targets=("dit.blocks.0.self_attn.q",)))
    save_lora(tmp_path / "l.safetensors", model)
    with safe_open(tmp_path / "l.safetensors", "pt") as f:
        keys = sorted(f.keys())
        assert f.get_tensor("diffusion_model.dit.blocks.0.self_attn.q.alpha").item() == 4.0
    assert keys == [f"diffusion_model.dit.blocks.0.self_attn.q.{k}" for k in ("alpha", "lora_down.weight", "lora_up.weight")]


def test_training_a_lora_on_a_checkpoint_moves_only_the_adapters(tiny_llm_dirs, tmp_path):
    base = build_tiny_checkpoint(tmp_path / "base.safetensors", preset("tiny"))  # open gates: gradients reach the blocks
    model = load_checkpoint(base)
    cfg = config(tiny_llm_dirs, tmp_path, steps=4, lora={"base": str(base), "rank": 4, "targets": ["dit.blocks"]})
    quiet_train(cfg)
    out = tmp_path / "run"
    assert (out / "lora.safetensors").is_file() and not (out / "model.safetensors").exists()
    with safe_open(out / "lora.safetensors", "pt") as f:
        ups = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")]
        assert f.metadata()["lidit_base"] == str(base)
    assert ups and any(u.abs().max() > 0 for u in ups)  # the adapters learned (they start at zero)
    reloaded = load_checkpoint(base)  # the base file is untouched
    for (k, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert any(isinstance(m, LoRALinear) for m in add_lora_model(base).modules())


def add_lora_model(base):
    model = load_checkpoint(base)
    add_lora(model, LoRAConfig(base=str(base)))
    return model
