"""Two real processes under torchrun on CPU (gloo): DDP and FSDP2 end with identical weights on every rank.

One torchrun launch runs the `python -m lidit train` entry point six times in the same two processes
(DDP; DDP for 2 steps and resumed for 2 more, saving asynchronously; FSDP for 2 steps; FSDP resumed for 2 more;
FSDP with the bf16 mixed-precision policy): starting Python, torch and the process group once
keeps this file well under a minute on a busy 2-core machine. The resume states they save (DCP) are then
loaded by one process: resharded, exactly.
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

from lidit.train import TrainConfig, train
from lidit.train.state import read_resume_tensors

ROOT = Path(__file__).resolve().parents[2]
DRIVER = """
import sys
import torch.distributed as dist
from lidit.train.cli import main
dist.init_process_group("gloo")
config, out = sys.argv[1], sys.argv[2]
main(["--config", config, f"output_dir={out}/ddp"])
split = ["--config", config, f"output_dir={out}/ddp-split", "async_checkpoint=true", "checkpoint_every=1"]
main([*split, "--stop-after", "2"])
main([*split, "--resume"])
main(["--config", config, f"output_dir={out}/fsdp", "--fsdp", "--stop-after", "2"])
main(["--config", config, f"output_dir={out}/fsdp", "--fsdp", "--resume"])
main(["--config", config, f"output_dir={out}/fsdp-bf16", "--fsdp", "mixed_precision=bf16", "--stop-after", "2",
      "sample_every=2", "tensorboard=true"])
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


def test_ddp_stopped_and_resumed_is_the_uninterrupted_run(runs):
    """2 + 2 steps on 2 processes, an async save after every step: bit for bit the 4 steps in one go."""
    assert rank_files(runs / "ddp-split") == rank_files(runs / "ddp")
    losses = [[json.loads(line)["loss"] for line in (runs / run / "log.jsonl").read_text().splitlines()]
              for run in ("ddp", "ddp-split")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    whole, split = read_resume_tensors(runs / "ddp/resume"), read_resume_tensors(runs / "ddp-split/resume")
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)
    for r in range(2):
        assert ((runs / f"ddp/resume/rng-rank{r}.json").read_text()
                == (runs / f"ddp-split/resume/rng-rank{r}.json").read_text())


def test_fsdp_shards_trains_and_resumes(runs):
    """FSDP2 (fully_shard per DiT block / refiner) on gloo: 2 steps, save per-rank shards, resume for 2 more."""
    files = sorted((runs / "fsdp/resume").rglob("*"))
    shards = [f for f in files if f.suffix == ".safetensors"]
    assert len(shards) == 2 and all(f.suffix in (".safetensors", ".json") for f in files if f.is_file())  # no pickle
    shard = load_file(shards[0])  # rank 0's
    full = read_resume_tensors(runs / "ddp/resume")
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
    # rank 0 drew the grid with the EMA gathered from both ranks' shards, and alone wrote TensorBoard
    assert (runs / "fsdp-bf16/samples/step-000002.png").is_file()
    assert len(list((runs / "fsdp-bf16/tb").glob("events.out.tfevents.*"))) == 1


def test_a_run_saved_by_two_processes_resumes_on_one(runs, tmp_path):
    """DCP reshards: the DDP (replicated) and FSDP (sharded) states of two ranks load into one process
    with the same weights, EMA and optimiser state, and training goes on from there."""
    base = json.loads((runs / "config.json").read_text())
    for saved in ("ddp", "fsdp"):
        cfg = TrainConfig.from_dict({**base, "output_dir": str(tmp_path / saved)})  # steps 4: load, then save
        with pytest.warns(UserWarning, match="data order and noise differ"):
            train(cfg, resume=runs / saved / "resume")
        mine, theirs = json.loads((tmp_path / saved / "rank0.json").read_text()), rank_files(runs / saved)[0]
        assert mine["step"] == 4 and (mine["weights"], mine["ema"]) == (theirs["weights"], theirs["ema"])
        before, after = read_resume_tensors(runs / saved / "resume"), read_resume_tensors(tmp_path / saved / "resume")
        assert before.keys() == after.keys() and any(k.startswith("optim.") for k in before)
        assert all(torch.equal(before[k], after[k]) for k in before), saved
        assert json.loads((tmp_path / saved / "resume/state.json").read_text())["world_size"] == 1
    cfg = TrainConfig.from_dict({**base, "output_dir": str(tmp_path / "more"), "steps": 6})
    with pytest.warns(UserWarning, match="data order and noise differ"):
        result = train(cfg, resume=runs / "ddp" / "resume")
    lines = [json.loads(line) for line in (tmp_path / "more/log.jsonl").read_text().splitlines()]
    assert result["step"] == 6 and [line["step"] for line in lines] == [5, 6]
    assert all(0 < line["loss"] < 10 for line in lines)
