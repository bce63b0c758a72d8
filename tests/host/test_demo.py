"""The README's main command on the real demo assets draws the prompt's scene.

The programmatic checker of the benchmark reads the picture back: the scene grammar's background,
then a red circle in the left column and a blue square in the right one.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lidit import scenes

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "workflows" / "api" / "lidit_paper_pipeline.json"
ASSETS = [REPO / "checkpoints" / "lidit-demo.safetensors",
          REPO / "models" / "LLM" / "SmolLM2-135M-Instruct" / "config.json",
          REPO / "models" / "LLM" / "gemma-3-270m" / "config.json"]


@pytest.mark.skipif(not all(p.exists() for p in ASSETS),
                    reason="needs the demo checkpoint and scripts/provision_llms.py's LLMs")
def test_main_workflow_draws_the_prompts_scene(tmp_path):
    prompt = json.loads(WORKFLOW.read_text())
    texts = [n["inputs"]["text"] for n in prompt.values() if n["class_type"] == "LIDiTInstructedEncode"]
    assert "a red circle and a blue square" in texts
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "run_workflow.py"), str(WORKFLOW), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    images = sorted(tmp_path.glob("*.png"))
    assert len(images) == 1
    image = Image.open(images[0]).convert("RGB")
    assert image.size == (64, 64)
    pixels = np.asarray(image)
    assert np.abs(scenes.estimate_background(pixels) - np.array(scenes.BACKGROUND)).max() < 12
    assert scenes.read_scene(pixels, 2) == [("red", "circle"), ("blue", "square")]
