"""The PixArt proof end to end at test size: a PixArt-architecture teacher written in PixArt's keys,
converted exactly, its pathway distilled from prompts alone, a from-scratch run, all scored."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lidit.checkpoint import load_checkpoint
from lidit.cli import main as lidit_main
from lidit.pixart import is_pathway_key
from lidit.study.pixart_proof import load_teacher
from lidit.train.teacher import Teacher, TeacherConfig


@pytest.fixture(scope="module")
def proof(tiny_llm_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("proof")
    lidit_main(["study", "pixart", "--tiny", "--llm", tiny_llm_dirs["tiny-llama"], "--llm", tiny_llm_dirs["tiny-qwen2"],
                "--encoder", tiny_llm_dirs["tiny-llama"], "--out", str(out)])
    return out


def test_every_stage_leaves_its_result_and_the_table_has_every_model(proof):
    assert (proof / "teacher" / "pixart.safetensors").is_file()
    assert len(list((proof / "student" / "inputs").glob("*.png"))) == 4  # the teacher's drawings, no scene image
    result = json.loads((proof / "proof.json").read_text())
    assert result["conversion"]["backbone_exact"]
    labels = [r["label"] for r in result["rows"]]
    assert labels == ["teacher (PixArt architecture)", "student @1", "student @2", "from scratch @1", "from scratch @2"]
    cpu = [r["cpu_seconds"] for r in result["rows"]]
    assert cpu[2] >= cpu[1] >= 0 and cpu[4] >= cpu[3] >= 0
    rows = [line for line in (proof / "table.md").read_text().splitlines() if line.startswith("| ")]
    models = [r for r in rows if r.split("|")[1].strip() in labels]
    assert len(models) == 5 and all(len(r.strip("|").split("|")) == 6 for r in models)
    for row in models:  # every figure is "value% [lo, hi]" with lo <= value <= hi
        for cell in row.strip("|").split("|")[3:]:
            value, bounds = cell.strip().split(" [")
            lo, hi = map(float, bounds.rstrip("]").split(","))
            assert lo <= float(value.rstrip("%")) <= hi
    assert any(r.startswith("| student @2 - teacher") for r in rows)


def test_the_student_trains_only_the_pathway(proof):
    before = load_file(proof / "student" / "converted.safetensors")
    after = load_file(proof / "student" / "run" / "model.safetensors")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(is_pathway_key(k) for k in moved)
    assert any(k.startswith("text.refiners") for k in moved)


def test_the_converted_backbone_is_the_teacher(proof, tiny_llm_dirs):
    """The trainer's distillation teacher (PixArt's file + the converted backbone) predicts exactly what
    the teacher as trained predicts: the export to PixArt's keys and the conversion lose nothing."""
    teacher = load_teacher(proof / "teacher" / "teacher.safetensors")
    converted = load_checkpoint(proof / "student" / "converted.safetensors")
    distil = Teacher(TeacherConfig(str(proof / "teacher" / "pixart.safetensors"), tiny_llm_dirs["tiny-llama"],
                                   max_tokens=16), torch.device("cpu"))
    captions = ["a red circle", "", "a blue square and a green triangle"]
    from lidit.llm import encode
    from lidit.train.teacher import CAPTION_ONLY

    states = encode(distil.encoder, captions, CAPTION_ONLY, 16, -1)
    x, t = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(0)), torch.tensor([0.9, 0.5, 0.1])
    with torch.no_grad():
        assert torch.equal(teacher(x, t, [states]), distil.predict(converted, x, t, captions))
        other = distil.predict(converted, x, t, ["a red circle", "a red circle", "a red circle"])
        assert not torch.equal(teacher(x, t, [states]), other)  # the captions matter


def test_a_finished_proof_is_kept_and_other_settings_are_refused(proof, tiny_llm_dirs):
    args = ["study", "pixart", "--tiny", "--llm", tiny_llm_dirs["tiny-llama"], "--llm", tiny_llm_dirs["tiny-qwen2"],
            "--encoder", tiny_llm_dirs["tiny-llama"], "--out", str(proof)]
    stamp = (proof / "teacher" / "pixart.safetensors").stat().st_mtime_ns
    lidit_main(args)
    assert (proof / "teacher" / "pixart.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="other settings"):
        lidit_main([*args[:-4], "--encoder", tiny_llm_dirs["tiny-qwen2"], "--out", str(proof)])
