import json

import pytest
import torch

from lidit.checkpoint import save_checkpoint
from lidit.config import preset
from lidit.model import LIDiTModel
from lidit.study import scenes
from lidit.study.benchmark import main


def test_eval_run_and_report_on_a_tiny_checkpoint(tmp_path, tiny_llm_dirs):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(ckpt, LIDiTModel(preset("tiny")).init_weights())
    out = tmp_path / "r.json"
    main(["run", "--checkpoint", str(ckpt), "--llm", tiny_llm_dirs["tiny-llama"], "--llm", tiny_llm_dirs["tiny-qwen2"],
          "--count", "8", "--steps", "2", "--out", str(out), "--label", "tiny"])
    r = json.loads(out.read_text())
    assert r["plain"]["images"] == 8 and r["paraphrase"]["images"] == 8
    assert set(r["plain"]["by_position"]) == set(scenes.POSITION_BUCKETS)
    assert r["plain"]["object_accuracy"] < 0.5  # an untrained model draws no objects
    assert [len(row) for row in r["plain"]["object_correct"]] == [e.scene.n for e in scenes.eval_set(1234, 8)]
    main(["report", str(out), str(out), "--markdown", str(tmp_path / "t.md"), "--chart", str(tmp_path / "c.png")])
    row = next(line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| tiny |"))
    assert row.startswith("| tiny | 2 |") and row.count("[") == 8  # two runs of one label pool as two seeds
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_position_chart_draws_a_panel_per_scored_set_with_markers_where_the_values_are(tmp_path):
    import numpy as np
    from PIL import Image

    from lidit.study.report import _COLOURS, _chart_y, position_chart
    from lidit.study.stats import Interval

    def quarters(prefix: str, value: float) -> dict:
        return {f"{prefix} {b}": Interval(value, value - 0.02, value + 0.02, "test") for b in scenes.POSITION_BUCKETS}

    variants = {"a": {**quarters("position", 0.95), **quarters("paraphrase position", 0.75)},
                "b": quarters("position", 0.99)}  # scored on the plain set only
    path = tmp_path / "chart.png"
    position_chart(variants, path)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] == 2 * 260 + 32  # two panels (no 6-object one) and one legend row
    # The paraphrase panel's axis starts at 60% (10% under its lowest interval, 73%): variant a's
    # marker is at 75% there, in its colour; b has no marker in that panel.
    y = round(_chart_y(0.75, y_top=260 + 24, height=260 - 24 - 30, floor=60))
    row = img[y]
    assert (row == _COLOURS[0]).all(axis=1).sum() >= 4 * 6  # a marker per quarter
    assert not (img[260:2 * 260] == _COLOURS[1]).all(axis=2).any()


def test_breakdown_finds_the_objects_that_failed_from_their_0_1_alone(tmp_path, capsys):
    from lidit.study.report import breakdown

    examples = scenes.PROMPT_SETS["paraphrase"].examples(7, 40)
    # Every triangle wrong, everything else right: what a record keeps is only these 0/1.
    rows = [[int(o.shape != "triangle") for o in e.scene.objects] for e in examples]
    run = {"settings": {"seed": 7, "count": 40}, "paraphrase": {"object_correct": rows}}
    by_shape = breakdown([run, run], "paraphrase", "shape")
    objects = sum(e.scene.n for e in examples)
    assert sum(n for n, _ in by_shape.values()) == 2 * objects  # two runs pool as two seeds
    assert by_shape["triangle"][1].value == 0.0 and by_shape["circle"][1].value == 1.0
    by_template = breakdown([run], "paraphrase", "template")
    assert sum(n for n, _ in by_template.values()) == objects
    assert {key.split(" (")[0] for key in by_template} == set(scenes.PROMPT_SETS["paraphrase"].styles)
    record = tmp_path / "seed0.json"  # a bench record keeps its scores under "score"
    record.write_text(json.dumps({"variant": "full", "score": run}))
    main(["breakdown", str(record), "--by", "shape"])
    assert "| triangle |" in capsys.readouterr().out
    other = {**run, "settings": {"seed": 8, "count": 40}}
    with pytest.raises(ValueError, match="other prompts"):
        breakdown([run, other], "paraphrase", "shape")


def test_called_differences_are_those_whose_difference_excludes_zero():
    from lidit.study.report import called_differences, difference_table
    from lidit.study.stats import Interval

    def iv(v, lo, hi):
        return Interval(v, lo, hi, "test")
    variants = {"full": {"prompts": iv(0.93, 0.91, 0.95), "paraphrases": iv(0.92, 0.91, 0.94)},
                "b": {"prompts": iv(0.90, 0.87, 0.93), "paraphrases": iv(0.86, 0.82, 0.90)}}
    diffs = {"b": {"prompts": iv(-0.03, -0.06, 0.001), "paraphrases": iv(-0.06, -0.10, -0.02),
                   "position 0-25%": iv(-0.05, -0.08, -0.01)}}  # not a table column: never tested
    called, tested = called_differences(diffs, variants, "full")
    assert tested == 2 and len(called) == 1
    assert called[0].startswith("b: paraphrases -6.0 [-10.0, -2.0] points") and "apart too" in called[0]
    table = difference_table(diffs, "full")
    assert "| minus full | prompts | paraphrases (objects) |" in table
    assert "| b | -3.0 [-6.0, +0.1] | **-6.0 [-10.0, -2.0]** |" in table
