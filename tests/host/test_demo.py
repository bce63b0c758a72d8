"""The example workflows on the real demo assets draw the prompt's scene (the first is the README's main command).

The programmatic checker of the benchmark reads the picture back: the scene grammar's background,
then a red circle in the left column and a blue square in the right one. The emoji workflow's picture
is read back by the emoji scorer (retrieval among the 3,781 real Twemoji images).
"""
import copy
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from harness import ComfyServer
from PIL import Image

from lidit.study import scenes
from lidit.study.emoji_scorer import Scorer

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


EMOJI_NEEDS = [REPO / "checkpoints" / "lidit-emoji.safetensors", *CASES["lidit_paper_pipeline"][1:]]
EMOJI_DATA = REPO / "data" / "emoji"
TURTLE, PIZZA = "1f422", "1f355"  # catalogue keys (code points)


def emoji_data() -> Path:
    """data/emoji as scripts/provision.sh makes it; made here when provisioning skipped it
    (LIDIT_SKIP_EMOJI=1), as the emoji unit tests do: a fetch that fails fails the test, never skips it."""
    if not (EMOJI_DATA / "catalog.json").is_file():
        run = subprocess.run([sys.executable, str(REPO / "scripts" / "provision_emoji.py"), "--out", str(EMOJI_DATA)],
                             capture_output=True, text=True, timeout=1800, check=False)
        assert run.returncode == 0, ("provisioning data/emoji from the npm registry failed; this test needs it and "
                                     f"does not skip:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    return EMOJI_DATA


def variant(prompt: dict, sampler: str, seed: int, text: str | None = None) -> dict:
    """The workflow with another seed and, if given, another positive prompt (the negative is empty)."""
    graph = copy.deepcopy(prompt)
    graph[sampler]["inputs"]["seed"] = seed
    for node in graph.values():
        if text and node["class_type"] == "LIDiTInstructedEncode" and node["inputs"]["text"]:
            node["inputs"]["text"] = text
    return graph


def test_emoji_workflow_draws_the_asked_emoji(tmp_path):
    """The scorer ranks all 3,781 emoji for each picture. Measured at the workflow's settings (euler,
    25 steps, cfg 6) with the real LLMs, over seeds 0-39: the turtle was first in 6 of 40 pictures
    (15%, 95% CI [7, 29]), in the top 5 in 25 (62.5% [47, 76]), in the top 20 in 37 (92.5% [80, 97]),
    34th at worst; a ranking that ignores the prompt puts it in the top 20 with probability 20 / 3,781.
    The workflow's seed 22 (one of the six firsts) ranks it first with the LLMs in bf16 or fp32, the
    next three seeds 5th, 8th and 2nd. "pizza, twemoji style" put the turtle 1,037th or lower in all
    40 pictures (100% [91, 100]), and the pizza higher than the turtle prompt did at the same seed in
    all 40. The bounds below leave room for another CPU's rounding."""
    if not all(p.exists() for p in EMOJI_NEEDS):
        pytest.skip("needs checkpoints/lidit-emoji.safetensors and scripts/provision_llms.py's LLMs")
    data = emoji_data()
    prompt = json.loads((REPO / "workflows" / "api" / "lidit_emoji.json").read_text())
    texts = [n["inputs"]["text"] for n in prompt.values() if n["class_type"] == "LIDiTInstructedEncode"]
    assert sorted(texts) == ["", "", "turtle, twemoji style", "turtle, twemoji style"]
    [sampler] = [nid for nid, node in prompt.items() if node["class_type"] == "LIDiTSampler"]
    seed = prompt[sampler]["inputs"]["seed"]
    graphs = {"workflow": prompt, **{f"seed {seed + i}": variant(prompt, sampler, seed + i) for i in (1, 2, 3)},
              "pizza": variant(prompt, sampler, seed, "pizza, twemoji style")}
    with ThreadPoolExecutor(1) as pool:  # the scorer (~13 s) is built while ComfyUI starts and draws
        building = pool.submit(Scorer.from_folder, data, styles=("twitter",))
        with ComfyServer(tmp_path / "comfy", pack_dir=REPO) as server:
            pids = {name: server.queue(graph) for name, graph in graphs.items()}
            images = {}
            for name, pid in pids.items():
                [png] = server.output_images(server.wait(pid, timeout=600))
                images[name] = np.asarray(Image.open(png).convert("RGB"))
        scorer = building.result()
    assert len(scorer.keys) == 3781, "data/emoji is not the full set (provisioned with --limit?)"
    assert all(image.shape == (32, 32, 3) for image in images.values())
    ranked = dict(zip(images, scorer.rank(list(images.values()), k=len(scorer.keys))))
    turtle = {name: order.index(TURTLE) + 1 for name, order in ranked.items()}
    assert turtle["workflow"] <= 5, turtle
    assert all(turtle[f"seed {seed + i}"] <= 20 for i in (1, 2, 3)), turtle
    # another prompt, same noise: another answer, the turtle far down, the pizza moved up
    assert ranked["pizza"][0] != TURTLE and turtle["pizza"] > 500, (turtle, ranked["pizza"][:5])
    assert ranked["pizza"].index(PIZZA) < ranked["workflow"].index(PIZZA), (ranked["pizza"][:5], ranked["workflow"][:5])
