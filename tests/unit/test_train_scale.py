"""The trainer's scale switches: activation checkpointing, weight-decay groups, the NaN guard."""
from __future__ import annotations

import json

import torch

import lidit.train as train_mod
import lidit.train.trainer as loop
from lidit.config import preset
from lidit.model import LIDiTModel
from lidit.states import TextStates
from lidit.train import decays, make_optimizer
from tests.fixtures_models import build_tiny_checkpoint
from tests.unit.test_train import config, quiet_train


def batch(cfg):
    g = torch.Generator().manual_seed(0)
    texts = [TextStates(torch.randn(2, 5, b.hidden_size, generator=g), torch.ones(2, 5, dtype=torch.bool),
                        torch.ones(2, 5, dtype=torch.bool)) for b in cfg.text.branches]
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([0.3, 0.8]), texts


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "m.safetensors", preset("tiny"))
    grads = []
    for checkpointing in (False, True):
        from lidit.checkpoint import load_checkpoint

        model = load_checkpoint(path).train()
        model.dit.checkpointing = checkpointing
        x, t, texts = batch(model.config)
        model(x, t, texts).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_weight_decay_spares_biases_norms_gates_and_embeddings():
    model = LIDiTModel(preset("tiny"))
    named = list(model.named_parameters())
    spared = {n for n, p in named if not decays(n, p)}
    assert "dit.blocks.0.self_attn.q.weight" not in spared and "dit.blocks.0.mlp.fc1.weight" not in spared
    for name in ("dit.blocks.0.self_attn.q.bias", "dit.blocks.0.self_attn.q_norm.weight", "dit.blocks.0.adaln.weight",
                 "text.refiners.0.blocks.0.gates.weight", "dit.patch_embed.weight", "dit.t_embedder.fc1.weight",
                 "dit.pos_embed.conv1.weight"):
        assert name in spared, name
    cfg = train_mod.TrainConfig(weight_decay=0.05)
    groups = make_optimizer(cfg, named, torch.device("cpu")).param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_a_non_finite_loss_skips_the_step_and_is_logged(tiny_llm_dirs, tmp_path, monkeypatch):
    real, calls = loop.training_loss, []

    def sometimes_nan(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss
    monkeypatch.setattr(loop, "training_loss", sometimes_nan)
    quiet_train(config(tiny_llm_dirs, tmp_path, steps=4, activation_checkpointing=True))
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    skipped = [line for line in lines if "skipped" in line]
    assert skipped == [{"step": 2, "skipped": "non-finite loss or gradient", "skipped_total": 1}]
    assert all(line["loss"] == line["loss"] for line in lines if "loss" in line)  # no NaN logged
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "run" / "model.safetensors").values())


def test_compiled_blocks_train_under_dynamo(tiny_llm_dirs, tmp_path):
    """compile="eager": dynamo traces every DiT block (inductor would also generate kernels)."""
    import torch._dynamo

    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    quiet_train(config(tiny_llm_dirs, tmp_path, steps=2, compile="eager"))
    assert counts["stats"]["unique_graphs"] >= 1
    from safetensors.torch import load_file

    assert all(not k.startswith("_orig_mod") and "._orig_mod" not in k for k in load_file(tmp_path / "run" / "model.safetensors"))
