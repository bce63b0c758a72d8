"""Two real processes under torchrun on CPU (gloo): DDP and FSDP2 end with identical weights on every rank.

One torchrun launch runs the `python -m lidit.train` entry point four times in the same two processes
(DDP; FSDP for 2 steps; FSDP resumed for 2 more; FSDP with the bf16 mixed-precision policy): starting Python, torch and the process group once
keeps this file well under a minute on a busy 2-core machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
DRIVER = """
import sys
import torch.distributed as dist
from lidit.train import main
dist.init_process_group("gloo")
config, out = sys.argv[1], sys.argv[2]
main(["--config", config, f"output_dir={out}/ddp"])
main(["--config", config, f"output_dir={out}/fsdp", "--fsdp", "--stop-after", "2"])
main(["--config", config, f"output_dir={out}/fsdp", "--fsdp", "--resume"])
main(["--config", config, f"output_dir={out}/fsdp-bf16", "--fsdp", "mixed_precision=bf16", "--stop-after", "2"])
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def runs(tiny_llm_dirs, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dist")
    cfg = {"model": "tiny", "llms": tiny_llm_dirs, "data": {"source": "scenes", "pool_size": 8}, "steps": 4,
           "batch_size": 4, "log_every": 1, "checkpoint_every": 100, "device": "cpu", "progress": "none",
           "cache_dir": str(tmp / "cache"), "rank_hashes": True, "threads": 1,
           "mixed_precision": "no"}  # DDP and FSDP must agree to fp32 rounding; the bf16 run is separate
    (tmp / "config.json").write_text(json.dumps(cfg))
    (tmp / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp / "driver.py"), str(tmp / "config.json"), str(tmp)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return tmp


def rank_files(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_ddp_two_processes_end_with_identical_weights(runs):
    r0, r1 = rank_files(runs / "ddp")
    assert r0["step"] == r1["step"] == 4
    assert r0["weights"] == r1["weights"] and r0["ema"] == r1["ema"]
    state = json.loads((runs / "ddp/resume/state.json").read_text())
    assert state["world_size"] == 2 and not state["fsdp"]
    # the ranks drew different data: their streams are seeded by rank
    rng = [json.loads((runs / f"ddp/resume/rng-rank{r}.json").read_text())["data"] for r in range(2)]
    assert rng[0] != rng[1]
    assert len((runs / "ddp/log.jsonl").read_text().splitlines()) == 4


def test_fsdp_shards_trains_and_resumes(runs):
    """FSDP2 (fully_shard per DiT block / refiner) on gloo: 2 steps, save per-rank shards, resume for 2 more."""
    assert (runs / "fsdp/resume/state-rank1.safetensors").is_file()
    shard = load_file(runs / "fsdp/resume/state-rank0.safetensors")
    full = load_file(runs / "ddp/resume/state.safetensors")
    key = "model.dit.blocks.0.mlp.fc1.weight"
    assert shard[key].shape[0] * 2 == full[key].shape[0]  # each rank holds half of every sharded weight
    r0, r1 = rank_files(runs / "fsdp")
    assert r0["step"] == r1["step"] == 4 and r0["weights"] == r1["weights"] and r0["ema"] == r1["ema"]
    fsdp, ddp = load_file(runs / "fsdp/model.safetensors"), load_file(runs / "ddp/model.safetensors")
    for name in ddp:  # same data, same seeds: the same training as DDP, up to reduction order
        torch.testing.assert_close(fsdp[name], ddp[name], atol=1e-5, rtol=1e-4)


def test_fsdp_with_the_bf16_policy_trains(runs):
    """Parameters gathered and computed in bf16, gradients reduced in fp32: finite, learning weights."""
    lines = [json.loads(line) for line in (runs / "fsdp-bf16/log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and all(0 < line["loss"] < 10 for line in lines)
    weights = load_file(runs / "fsdp-bf16/model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert weights["dit.final.linear.weight"].abs().max() > 0  # zero-initialised, moved by training
