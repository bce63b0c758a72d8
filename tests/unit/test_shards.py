"""Sharded data: folder -> tar shards, streamed by DataLoader workers, memory-mapped or online text
features, exact resume on one process and under 2-process DDP."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import lidit.train as train_mod
from lidit.checkpoint import load_checkpoint, read_metadata
from lidit.cli import main as lidit_main
from lidit.config import preset
from lidit.data.features import FeatureCache, ShardFeatures
from lidit.data.shards import ShardSet, ShardStream, convert_folder, reader_plan
from lidit.instruction import PromptTemplate
from lidit.llm import encode
from lidit.train import TrainConfig
from lidit.train.inputs import OnlineText

ROOT = Path(__file__).resolve().parents[2]
SIZES = [(40, 40), (36, 36), (60, 40), (64, 40), (40, 60), (30, 45), (80, 44), (48, 48)]


def write_folder(root: Path, n: int = 48) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")
        (root / f"img{i:03d}.txt").write_text(f"a red circle number {i}\n")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("shards")
    write_folder(tmp / "imgs")
    lidit_main(["convert", "shards", str(tmp / "imgs"), str(tmp / "shards"), "--resolution", "32", "--step", "4",
                 "--shard-size", "6"])
    return tmp / "shards"


def test_conversion_writes_webdataset_tars_with_seekable_item_lists(shard_dir):
    shards = ShardSet(shard_dir)
    assert len(shards) == 8 and shards.index["kind"] == "pixels"
    seen = []
    for s, name in enumerate(shards.names):
        with tarfile.open(shard_dir / f"{name}.tar") as tar:
            names = tar.getnames()
        items = shards.items(s)
        assert names == [f"{it.key}.{ext}" for it in items for ext in ("txt", "png")]  # WebDataset: key.ext
        with open(shard_dir / f"{name}.tar", "rb") as f:
            for it in items:
                offset, size = it.members["png"]
                f.seek(offset)
                image = Image.open(io.BytesIO(f.read(size)))
                assert image.size == shards.buckets[it.bucket]  # cover-cropped to its bucket at conversion
                seen.append(it.caption)
    assert sorted(seen) == sorted(f"a red circle number {i}" for i in range(48))
    assert len({shards.items(s)[0].bucket for s in range(len(shards))} | {it.bucket for it in shards.items(0)}) > 1


def test_readers_split_shards_and_batches_keep_one_bucket(shard_dir):
    shards = ShardSet(shard_dir)
    plans = [reader_plan(shards, 0, r, 4, 2) for r in range(4)]
    per_reader = [[next(p) for _ in range(3)] for p in plans]
    used = [{shard for items in batches for shard, _ in items} for batches in per_reader]
    assert all(not (used[a] & used[b]) for a in range(4) for b in range(a + 1, 4))  # each reader its own shards
    for batches in per_reader:
        for items in batches:
            assert len(items) == 2 and len({it.bucket for _, it in items}) == 1
    with pytest.raises(ValueError, match="every reader needs at least one shard"):
        ShardStream(shard_dir, 2, 0, rank=0, world=3, workers=3)


def test_stream_resumes_exactly_with_workers(shard_dir):
    """The state is the number of batches handed out: a new stream with 2 workers continues exactly."""
    a = ShardStream(shard_dir, 2, seed=1, workers=2)
    first = [a.next_batch() for _ in range(5)]
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(7)]  # crosses an epoch (48 items, 8 shards, 2 readers)
    b = ShardStream(shard_dir, 2, seed=1, workers=2)
    b.load_state_dict(json.loads(json.dumps(state)))
    again = [b.next_batch() for _ in range(7)]
    for (x, c, _), (y, d, _) in zip(rest, again):
        assert c == d and torch.equal(x, y)
    assert [c for _, c, _ in first] != [c for _, c, _ in rest[:5]]
    # the two workers interleave two readers: consecutive batches come from disjoint shard sets
    assert {int(c.split()[-1]) // 6 for c in first[0][1]}.isdisjoint({int(c.split()[-1]) // 6 for c in first[1][1]})


class StubVAE:
    class config:
        latent_channels, scaling_factor, shift_factor = 4, 2.0, 0.5

    def encode(self, x):
        mean = torch.nn.functional.avg_pool2d(x, 4)[:, :1].repeat(1, 4, 1, 1)
        dist = type("Dist", (), {"mean": mean, "std": torch.full_like(mean, 0.1)})()
        return type("Out", (), {"latent_dist": dist})()


def test_latent_shards_sample_the_stored_distribution(tmp_path):
    write_folder(tmp_path / "imgs", 8)
    index = convert_folder(tmp_path / "imgs", tmp_path / "lat", 32, 4, shard_size=4, vae=StubVAE(), vae_batch=3)
    assert index["kind"] == "latents" and index["latent_scale"] == [2.0, 0.5] and index["latent_channels"] == 4
    stream = ShardStream(tmp_path / "lat", 1, seed=0)
    x1, _, _ = stream.next_batch()
    stream.load_state_dict({"consumed": 0, "world": 1, "readers": 1})
    x2, _, _ = stream.next_batch()
    assert x1.shape[1] == 4 and torch.equal(x1, x2)  # the same draw for the same (seed, reader, batch)
    x3, _, _ = stream.next_batch()
    assert not torch.equal(x1, x3)
    with pytest.raises(FileExistsError):
        convert_folder(tmp_path / "imgs", tmp_path / "lat", 32, 4)


def config(tiny_llm_dirs, tmp_path: Path, shard_dir: Path, **kw) -> TrainConfig:
    d = {"model": {"preset": "tiny", "overrides": {"resolution": 32}}, "llms": tiny_llm_dirs,
         "data": {"source": f"shards:{shard_dir}", "workers": 2}, "output_dir": str(tmp_path / "run"),
         "cache_dir": str(tmp_path / "cache"), "steps": 4, "batch_size": 2, "log_every": 1, "checkpoint_every": 100,
         "device": "cpu", "progress": "none", "caption_dropout": 0.5, "mixed_precision": "no"}
    d.update(kw)
    return TrainConfig.from_dict(d)


def quiet_train(cfg: TrainConfig, **kw) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_mod.train(cfg, **kw)


def test_memory_mapped_features_equal_the_cache_and_resume_is_exact(tiny_llm_dirs, tiny_llms, shard_dir, tmp_path):
    data = tmp_path / "data"
    import shutil

    shutil.copytree(shard_dir, data)
    whole = quiet_train(config(tiny_llm_dirs, tmp_path / "a", data))
    feature_dirs = sorted((data / "features").iterdir())
    assert len(feature_dirs) == 2 and len(list(feature_dirs[0].glob("shard-*.safetensors"))) == 8
    assert whole["features"][0]["mode"] == "memory-mapped" and whole["features"][0]["encoded"] == 48
    # the memory-mapped states are what the LLM gives for those captions
    shards = ShardSet(data)
    items = shards.items(3)[:3]
    text_cfg = preset("tiny").text
    template = PromptTemplate.of(text_cfg)
    for llm, folder in zip(tiny_llms, feature_dirs):
        features = ShardFeatures(folder)
        captions = [it.caption for it in items] + [""]
        got = features.states(captions, "cpu", features.entries(shards.names[3], [it.key for it in items]) + [None])
        want = encode(llm, captions, template, text_cfg.max_tokens)
        assert torch.equal(got.mask, want.mask) and torch.equal(got.prompt, want.prompt)
        torch.testing.assert_close(got.hidden, want.hidden, atol=2e-3, rtol=2e-3)  # float16 storage
    # 2 steps + resume for 2 = 4 in one go, bit for bit, with 2 DataLoader workers; nothing re-encoded
    cfg = config(tiny_llm_dirs, tmp_path / "b", data)
    quiet_train(cfg, stop_after=2)
    resumed = quiet_train(cfg, resume=tmp_path / "b/run/resume")
    assert resumed["features"][0]["encoded"] == 0
    a, b = load_file(tmp_path / "a/run/model.safetensors"), load_file(tmp_path / "b/run/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_online_features_encode_each_batch(tiny_llm_dirs, tiny_llms, shard_dir, tmp_path, monkeypatch):
    calls = []
    real = OnlineText.states

    def counted(self, captions, device, entries=None):
        calls.append(list(captions))
        assert entries is None
        return real(self, captions, device, entries)

    monkeypatch.setattr(OnlineText, "states", counted)
    result = quiet_train(config(tiny_llm_dirs, tmp_path, shard_dir, text_features="online", steps=2,
                                data={"source": f"shards:{shard_dir}", "workers": 0}))
    assert result["step"] == 2 and [f["mode"] for f in result["features"]] == ["online", "online"]
    assert len(calls) == 2 * 2  # every step, every branch
    # its FeatureNorm statistics are those of the cached features of the same captions
    sample = ShardSet(shard_dir).captions(1000)
    assert len(sample) == 48
    text_cfg = preset("tiny").text
    template = PromptTemplate.of(text_cfg)
    online = OnlineText(tiny_llms[0], template, text_cfg.max_tokens, -3, sample).channel_stats()
    cache = FeatureCache(tmp_path / "fc", list(tiny_llm_dirs.values())[0], -3, template, text_cfg.max_tokens, "float32")
    cache.build(sample, lambda: tiny_llms[0])
    for got, want in zip(online, cache.load(sample).channel_stats()):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


DRIVER = """
import json
import sys
import torch.distributed as dist
from lidit.train.cli import main

if __name__ == "__main__":  # DataLoader workers of a rank start afresh and import this file
    dist.init_process_group("gloo")
    for args in json.loads(open(sys.argv[1]).read()):
        main(args)
    dist.destroy_process_group()
"""


def torchrun(tmp_path: Path, runs: list[list[str]]) -> None:
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "driver.py"), str(tmp_path / "runs.json")]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]


def tiny_vae(folder: Path) -> Path:
    """A real diffusers AutoencoderKL folder, tiny, with SD3's latent constants."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=4, scaling_factor=1.5305, shift_factor=0.0609).save_pretrained(folder)
    return folder


def test_two_processes_with_workers_resume_mid_epoch_and_run_the_1b_config_at_tiny_size(tiny_llm_dirs, shard_dir,
                                                                                         tmp_path):
    """One torchrun launch, 2 ranks x 1 DataLoader worker: (1) DDP, 2 steps + resume = 4 steps in one go,
    bit for bit (an epoch is 6 steps here); (2) configs/lidit-1b-shards.json as documented (FSDP2,
    activation checkpointing, memory-mapped features) on latent shards converted with a diffusers VAE,
    the model and LLMs shrunk by overrides."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shard_dir, data)
    cfg = config(tiny_llm_dirs, tmp_path, data, data={"source": f"shards:{data}", "workers": 1}, batch_size=4,
                 threads=1).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_folder(tmp_path / "imgs", 16)
    lidit_main(["convert", "shards", str(tmp_path / "imgs"), str(tmp_path / "latents"), "--resolution", "64", "--step", "16",
                 "--shard-size", "4", "--vae", str(tiny_vae(tmp_path / "vae"))])
    llama, qwen = tiny_llm_dirs["tiny-llama"], tiny_llm_dirs["tiny-qwen2"]
    names = ("Meta-Llama-3-8B-Instruct", "Qwen1.5-7B-Chat")
    tiny_1b = {"dit": {"depth": 2, "hidden": 32, "heads": 2},
               "text": {"width": 32, "heads": 2, "max_tokens": 32,
                        "branches": [{"name": names[0], "hidden_size": 64}, {"name": names[1], "hidden_size": 48}]}}
    big = ["--config", str(ROOT / "configs/lidit-1b-shards.json"), "--fsdp", f"output_dir={tmp_path / 'big'}",
           f"data.source=shards:{tmp_path / 'latents'}", "data.workers=1", f"llms={json.dumps(dict(zip(names, (llama, qwen))))}",
           f"model={json.dumps({'preset': 'lidit-1b', 'overrides': tiny_1b})}", "steps=2", "batch_size=4", "grad_accum=1",
           "warmup_steps=0", "log_every=1", "threads=1", "mixed_precision=no", "progress=none", "device=cpu",
           f"cache_dir={tmp_path / 'cache'}"]
    torchrun(tmp_path, [["--config", str(tmp_path / "config.json"), f"output_dir={tmp_path / 'whole'}"],
                        ["--config", str(tmp_path / "config.json"), f"output_dir={tmp_path / 'parts'}", "--stop-after", "2"],
                        ["--config", str(tmp_path / "config.json"), f"output_dir={tmp_path / 'parts'}", "--resume"],
                        big])
    a, b = load_file(tmp_path / "whole/model.safetensors"), load_file(tmp_path / "parts/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "whole/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    model = load_checkpoint(tmp_path / "big/model.safetensors")
    assert model.config.latent_format == "sd3" and model.config.dit.in_channels == 16
    stats = json.loads(read_metadata(tmp_path / "big/model.safetensors")["training_stats"])
    assert stats["world_size"] == 2 and stats["fsdp"] and stats["step"] == 2
    assert [f["mode"] for f in stats["features"]] == ["memory-mapped"] * 2
