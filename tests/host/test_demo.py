"""The example workflows on the real demo assets draw the prompt's scene (the first is the README's main command).

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

from lidit.study import scenes

REPO = Path(__file__).resolve().parents[2]
LLMS = REPO / "models" / "LLM"
CASES = {  # workflow -> what it needs: its checkpoint and LLMs
    "lidit_paper_pipeline": [REPO / "checkpoints" / "lidit-demo.safetensors",
                             LLMS / "SmolLM2-135M-Instruct" / "config.json", LLMS / "gemma-3-270m" / "config.json"],
    "lidit_one_llm": [REPO / "checkpoints" / "lidit-demo-smollm2.safetensors",
                      LLMS / "SmolLM2-135M-Instruct" / "config.json"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_workflow_draws_the_prompts_scene(tmp_path, name):
    if not all(p.exists() for p in CASES[name]):
        pytest.skip("needs the demo checkpoints and scripts/provision_llms.py's LLMs")
    workflow = REPO / "workflows" / "api" / f"{name}.json"
    prompt = json.loads(workflow.read_text())
    texts = [n["inputs"]["text"] for n in prompt.values() if n["class_type"] == "LIDiTInstructedEncode"]
    assert "a red circle and a blue square" in texts
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "run_workflow.py"), str(workflow), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    images = sorted(tmp_path.glob("*.png"))
    assert len(images) == 1
    image = Image.open(images[0]).convert("RGB")
    assert image.size == (64, 64)
    pixels = np.asarray(image)
    assert np.abs(scenes.estimate_background(pixels) - np.array(scenes.BACKGROUND)).max() < 12
    assert scenes.read_scene(pixels, 2) == [("red", "circle"), ("blue", "square")]
