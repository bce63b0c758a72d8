import subprocess
import sys

import pytest
import torch
from PIL import Image

from lidit.checkpoint import save_checkpoint
from lidit.cli import main
from lidit.config import preset
from lidit.model import LIDiTModel


def test_info_prints_parameter_counts_of_a_preset(capsys):
    main(["info", "lidit-1b"])
    out = capsys.readouterr().out
    assert '"hidden": 1152' in out and "total" in out and "979,821,856" in out


def test_generate_writes_a_png_of_the_requested_size_and_is_seeded(tmp_path, tiny_llm_dirs):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.safetensors"
    model = LIDiTModel(preset("tiny")).init_weights()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_checkpoint(ckpt, model)
    args = ["generate", "--checkpoint", str(ckpt), "--llm", tiny_llm_dirs["tiny-llama"],
            "--llm", tiny_llm_dirs["tiny-qwen2"], "--prompt", "a red circle", "--steps", "3", "--width", "24"]
    main(args + ["--seed", "1", "--out", str(tmp_path / "a.png")])
    main(args + ["--seed", "1", "--out", str(tmp_path / "b.png")])
    main(args + ["--seed", "2", "--out", str(tmp_path / "c.png")])
    a, b, c = (Image.open(tmp_path / f"{n}.png") for n in "abc")
    assert a.size == (24, 16)
    assert a.tobytes() == b.tobytes() != c.tobytes()


def test_generate_names_the_expected_branches(tmp_path, tiny_llm_dirs):
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(ckpt, LIDiTModel(preset("tiny")))
    run = subprocess.run([sys.executable, "-m", "lidit", "generate", "--checkpoint", str(ckpt),
                          "--llm", tiny_llm_dirs["tiny-llama"], "--prompt", "x"], capture_output=True, text=True)
    assert run.returncode != 0
    assert "2 LLM branches, in order: tiny-llama (hidden 64), tiny-qwen2 (hidden 48); got 1" in run.stderr


def test_generate_decodes_a_latent_checkpoint_with_a_local_vae(tmp_path, tiny_llm_dirs):
    import dataclasses

    from diffusers import AutoencoderKL

    vae_dir = tmp_path / "vae"
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=4).save_pretrained(vae_dir)
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, latent_format="sd3", resolution=32, dit=dataclasses.replace(cfg.dit, in_channels=16))
    ckpt = tmp_path / "latent.safetensors"
    save_checkpoint(ckpt, LIDiTModel(cfg).init_weights())
    args = ["generate", "--checkpoint", str(ckpt), "--llm", tiny_llm_dirs["tiny-llama"], "--llm", tiny_llm_dirs["tiny-qwen2"],
            "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit, match="pass --vae"):
        main(args)
    main(args + ["--vae", str(vae_dir)])
    assert Image.open(tmp_path / "x.png").size == (32, 32)  # 4x4 latents, decoded 8x
