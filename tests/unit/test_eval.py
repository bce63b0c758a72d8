import json

import torch

from lidit import scenes
from lidit.checkpoint import save_checkpoint
from lidit.config import preset
from lidit.eval import main
from lidit.model import LIDiTModel


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
    assert row.startswith("| tiny | 2 |") and row.count("[") == 7  # two runs of one label pool as two seeds
    assert (tmp_path / "c.png").stat().st_size > 1000
