"""Training the LLM pathway of a converted PixArt, with the trainer's denoising loss and by distillation
from PixArt itself: only the pathway moves, the fresh refiners get their feature statistics, a stopped
run resumes to the same weights, and distillation closes the gap to the teacher."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lidit.cli import main as lidit_main
from lidit.pixart import is_pathway_key
from lidit.train import TrainConfig, train
from tests.fixtures_models import TINY_PIXART, build_tiny_pixart, build_tiny_t5

SIDE = 384  # PixArt's position table needs a mean side above 264 px


@pytest.fixture(scope="module")
def converted(tiny_llm_dirs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pixart")
    out = root / "lidit-pixart.safetensors"
    lidit_main(["convert", "pixart", str(build_tiny_pixart(root / "pixart.safetensors")), "--out", str(out),
                "--heads", str(TINY_PIXART["heads"]), "--resolution", str(SIDE),
                *(a for folder in tiny_llm_dirs.values() for a in ("--llm", folder))])
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """Four captioned images and a tiny 8x diffusers VAE with 4 latent channels."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a photo of thing number {i}\n")
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=4).save_pretrained(root / "vae")
    return {"images": str(root), "vae": str(root / "vae")}


def run(converted: Path, data: dict, tiny_llm_dirs: dict, out: Path, config: dict | None = None, **kw) -> dict:
    cfg = TrainConfig.from_dict({
        "init": str(converted), "trainable": "pathway", "llms": list(tiny_llm_dirs.values()),
        "data": {"source": f"folder:{data['images']}", "vae": data["vae"], "buckets": "none"},
        "output_dir": str(out), "cache_dir": str(out.parent / "cache"), "steps": 2, "batch_size": 2, "lr": 1e-2,
        "log_every": 1, "checkpoint_every": 1, "device": "cpu", "progress": "none", "caption_dropout": 0.5,
        "mixed_precision": "no", **(config or {})})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny VAE's scaling factor is not SDXL's
        return train(cfg, **kw)


def test_only_the_pathway_trains_from_a_converted_pixart(converted, data, tiny_llm_dirs, tmp_path):
    run(converted, data, tiny_llm_dirs, tmp_path / "run")
    before, after = load_file(converted), load_file(tmp_path / "run" / "model.safetensors")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(is_pathway_key(k) for k in moved)
    assert any(".cross_attn.kv." in k for k in moved) and any(k.startswith("text.refiners") for k in moved)
    assert after["text.refiners.0.feature_norm.std"].ne(1).any()  # measured on the captions, not the defaults


def test_a_stopped_pathway_run_resumes_to_the_same_weights(converted, data, tiny_llm_dirs, tmp_path):
    run(converted, data, tiny_llm_dirs, tmp_path / "whole")
    run(converted, data, tiny_llm_dirs, tmp_path / "split", stop_after=1)
    run(converted, data, tiny_llm_dirs, tmp_path / "split", resume=tmp_path / "split" / "resume")
    whole, split = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "split"))
    assert all(torch.equal(whole[k], split[k]) for k in whole)


def test_the_trained_pathway_joins_the_pixart_it_was_trained_on(converted, data, tiny_llm_dirs, tmp_path):
    """`convert pathway` keeps the pathway of the trained checkpoint; joined with PixArt's own weights
    (as LI-DiT From PixArt does) it gives back the trained model exactly."""
    from lidit.pixart import join_pathway, pixart_keys

    run(converted, data, tiny_llm_dirs, tmp_path / "run")
    lidit_main(["convert", "pathway", str(tmp_path / "run" / "model.safetensors"), "--out", str(tmp_path / "p.safetensors")])
    pixart = pixart_keys(load_file(converted.parent / "pixart.safetensors"))
    _, joined = join_pathway(pixart, tmp_path / "p.safetensors")
    trained = load_file(tmp_path / "run" / "model.safetensors")
    assert set(joined) == set(trained) and all(torch.equal(joined[k], trained[k]) for k in trained)


@pytest.fixture(scope="module")
def teacher(converted) -> dict:
    """PixArt's own weights and a tiny T5 encoder as wide as its caption channels."""
    t5 = build_tiny_t5(converted.parent / "t5", hidden=TINY_PIXART["caption"])
    return {"pixart": str(converted.parent / "pixart.safetensors"), "text_encoder": str(t5), "max_tokens": 32}


def test_distillation_trains_only_the_pathway_and_resumes_exactly(converted, data, tiny_llm_dirs, teacher, tmp_path):
    distil = {"teacher": teacher}
    run(converted, data, tiny_llm_dirs, tmp_path / "whole", distil)
    run(converted, data, tiny_llm_dirs, tmp_path / "split", distil, stop_after=1)
    run(converted, data, tiny_llm_dirs, tmp_path / "split", distil, resume=tmp_path / "split" / "resume")
    before = load_file(converted)
    whole, split = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "split"))
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    moved = {k for k in before if not torch.equal(before[k], whole[k])}
    assert moved and all(is_pathway_key(k) for k in moved)


def test_distillation_closes_the_gap_to_the_teacher(converted, data, tiny_llm_dirs, teacher, tmp_path):
    """The student's squared distance to PixArt's predictions, logged per step, falls."""
    import json

    run(converted, data, tiny_llm_dirs, tmp_path / "run",
        {"teacher": teacher, "steps": 12, "caption_dropout": 0.0, "checkpoint_every": 100})
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


def test_the_teacher_is_pixart_whatever_the_student_trains(converted, teacher):
    """The teacher's prediction through the student's model is PixArt's own however the student's
    pathway K/V and its LoRA adapters have moved: it keeps PixArt's K/V and switches adapters off."""
    import copy

    from lidit.checkpoint import load_checkpoint
    from lidit.lora import LoRAConfig, add_lora
    from lidit.train.teacher import Teacher, TeacherConfig

    def own_kv(context):  # the same caption tokens through the model's own K/V
        out = copy.copy(context)
        out.kv = None
        return out

    torch.manual_seed(0)
    model = load_checkpoint(converted)
    judge = Teacher(TeacherConfig(**teacher), torch.device("cpu"))
    x, t, captions = torch.randn(2, 4, 48, 48), torch.tensor([0.9, 0.3]), ["a red circle", ""]
    context = judge.context(captions, x.dtype)
    with torch.no_grad():
        before = judge.predict(model, x, t, captions)
        assert torch.equal(model(x, t, None, context=own_kv(context)), before)  # converted: PixArt's K/V
        for block in model.dit.blocks:
            block.cross_attn.kv.weight.add_(1.0)
        add_lora(model, LoRAConfig(base="unused", rank=2, targets=("dit.blocks",)), lambda path: path.endswith(".kv"))
        for name, p in model.named_parameters():
            if name.endswith("up.weight"):
                p.normal_()
        assert torch.equal(judge.predict(model, x, t, captions), before)
        assert (model(x, t, None, context=own_kv(context)) - before).abs().max() > 1e-2  # the student did move


def test_distillation_with_backbone_lora_writes_adapters_and_a_pathway_and_resumes(converted, data, tiny_llm_dirs,
                                                                                  teacher, tmp_path):
    """LoRA on the backbone (not on the pathway, which trains in full): lora.safetensors for
    LoraLoaderModelOnly and pathway.safetensors for LI-DiT From PixArt; a stopped run resumes exactly."""
    from lidit.pixart import join_pathway, pixart_keys

    cfg = {"teacher": teacher, "lora": {"base": str(converted), "rank": 2}}
    run(converted, data, tiny_llm_dirs, tmp_path / "whole", {**cfg, "init": None})
    run(converted, data, tiny_llm_dirs, tmp_path / "split", {**cfg, "init": None}, stop_after=1)
    run(converted, data, tiny_llm_dirs, tmp_path / "split", {**cfg, "init": None}, resume=tmp_path / "split" / "resume")
    for name in ("lora.safetensors", "pathway.safetensors"):
        whole, split = (load_file(tmp_path / run_ / name) for run_ in ("whole", "split"))
        assert set(whole) == set(split) and all(torch.equal(whole[k], split[k]) for k in whole), name
    adapters = load_file(tmp_path / "whole" / "lora.safetensors")
    assert any(k.endswith("mlp.fc1.lora_up.weight") and adapters[k].any() for k in adapters)
    assert not any("cross_attn.kv" in k or k.startswith("diffusion_model.text.") for k in adapters)
    _, joined = join_pathway(pixart_keys(load_file(converted.parent / "pixart.safetensors")),
                             tmp_path / "whole" / "pathway.safetensors")
    before = load_file(converted)
    moved = {k for k in before if not torch.equal(before[k], joined[k])}
    assert moved and all(is_pathway_key(k) for k in moved)


def test_distillation_under_fsdp2_trains_and_resumes(converted, data, tiny_llm_dirs, teacher, tmp_path):
    """One FSDP2 process (a one-member group): the teacher's forward runs through the sharded root."""
    import torch.distributed as dist

    try:
        run(converted, data, tiny_llm_dirs, tmp_path / "whole", {"teacher": teacher, "fsdp": True})
        run(converted, data, tiny_llm_dirs, tmp_path / "split", {"teacher": teacher, "fsdp": True}, stop_after=1)
        run(converted, data, tiny_llm_dirs, tmp_path / "split", {"teacher": teacher, "fsdp": True},
            resume=tmp_path / "split" / "resume")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    import json

    from lidit.checkpoint import read_metadata

    assert json.loads(read_metadata(tmp_path / "whole" / "model.safetensors")["training_stats"])["fsdp"]
    before = load_file(converted)
    whole, split = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "split"))
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    moved = {k for k in before if not torch.equal(before[k], whole[k])}
    assert moved and all(is_pathway_key(k) for k in moved)


def test_a_teacher_needs_a_converted_checkpoint_and_a_frozen_backbone(teacher):
    with pytest.raises(ValueError, match="set init \\(or lora.base\\) to the converted checkpoint and trainable: pathway"):
        TrainConfig.from_dict({"teacher": teacher, "init": "x.safetensors"})
    with pytest.raises(ValueError, match="teacher takes pixart, text_encoder"):
        TrainConfig.from_dict({"teacher": {"pixart": "x"}, "init": "x", "trainable": "pathway"})
