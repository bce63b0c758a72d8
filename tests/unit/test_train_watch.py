"""What a researcher watches (TensorBoard scalars, sample grids, the benchmark) and the async resume save."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from lidit.config import preset
from lidit.model import LIDiTModel
from lidit.train import TrainConfig, make_optimizer
from lidit.train.dist import Dist
from lidit.train.optim import EMA
from lidit.train.state import ResumeSaver, load_resume, rank_rngs, read_resume_tensors
from tests.unit.test_train import config, quiet_train


def test_tensorboard_sample_grids_and_benchmark(tiny_llm_dirs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    quiet_train(config(tiny_llm_dirs, tmp_path, steps=4, tensorboard=True, sample_every=2, benchmark_every=2,
                       benchmark_count=4, sample_prompts=["a red circle", "a blue square"]))
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step-000002.png", "step-000004.png"]
    assert Image.open(run / "samples/step-000004.png").size == (4 * 16 * 2, 16 * 2)  # 4 columns of 16 px, shown at 2x
    assert (run / "samples/step-000004.txt").read_text() == "a red circle\na blue square\n"
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    bench = [line for line in lines if "benchmark" in line]
    assert [line["step"] for line in bench] == [2, 4]
    assert all(line["benchmark"]["prompts"] == 4 and 0 <= line["benchmark"]["object_accuracy"] <= 1 for line in bench)
    logged = [line for line in lines if "loss" in line]
    assert all(line["tokens_per_s"] == pytest.approx(line["images_per_s"] * 64, rel=1e-3) for line in logged)  # (16/2)²

    events = EventAccumulator(str(run / "tb")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "train/tokens_per_s",
            "benchmark/object_accuracy", "benchmark/prompt_accuracy"} <= scalars
    assert "train/gpu_memory_gb" not in scalars  # CUDA only
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([line["loss"] for line in logged])
    assert [e.step for e in events.Scalars("benchmark/object_accuracy")] == [2, 4]
    assert [e.step for e in events.Images("samples")] == [2, 4]


def test_tensorboard_is_optional(tiny_llm_dirs, tmp_path, monkeypatch):
    """Never imported unless asked for; asked for without the package: a clear error before training."""
    code = "import sys, lidit.train, lidit.train.watch; sys.exit('tensorboard' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install tensorboard"):
        quiet_train(config(tiny_llm_dirs, tmp_path, steps=1, tensorboard=True))


class Stream:
    def __init__(self) -> None:
        self.state = {"position": 3}

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def trained(cfg: TrainConfig):
    model = LIDiTModel(preset("tiny")).init_weights()
    named = list(model.named_parameters())
    opt = make_optimizer(cfg, named, torch.device("cpu"))
    return named, opt, EMA(named)


def test_async_save_writes_the_state_as_it_was_and_loads_back(tmp_path):
    cfg = TrainConfig(model="tiny")
    named, opt, ema = trained(cfg)
    for _, p in named:
        p.grad = torch.randn_like(p)
    opt.step()
    saved = {n: p.detach().clone() for n, p in named}
    moments = {n: opt.state[p]["exp_avg"].clone() for n, p in named}
    saver = ResumeSaver(tmp_path, Dist(), async_save=True)
    saver.save(1, named, ema, opt, Stream(), *rank_rngs(0, 0, torch.device("cpu")), cfg, preset("tiny"), {"step": 1})
    assert saver.pending is not None and not (tmp_path / "resume").exists()  # published only once written
    with torch.no_grad():  # training goes on while the save is written
        for _, p in named:
            p.add_(1.0)
    saver.wait()
    state = read_resume_tensors(tmp_path / "resume")
    assert all(torch.equal(state[f"model.{n}"], saved[n]) for n in saved)

    named2, opt2, ema2 = trained(cfg)
    stream = Stream()
    stream.state = None
    load_resume(tmp_path / "resume", preset("tiny"), named2, ema2, opt2, stream,
                *rank_rngs(1, 0, torch.device("cpu")), cfg, Dist())
    assert stream.state == {"position": 3}
    for n, p in named2:
        assert torch.equal(p.detach(), saved[n]) and torch.equal(opt2.state[p]["exp_avg"], moments[n])
        assert torch.equal(ema2.shadow[n], ema.shadow[n])
    assert all(int(opt2.state[p]["step"]) == 1 for _, p in named2)
