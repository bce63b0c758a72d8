"""Every UI workflow loads into the real frontend with every node known and no page errors, and
the frontend turns it into exactly its API twin (what the Run button would send). Also takes
the README's screenshot of the main workflow, docs/workflow.png: written when missing, and
refreshed with the other generated files by LIDIT_UPDATE_SNAPSHOTS=1 (so a plain test run
leaves the working tree clean)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import graphs
import harness
import lidit_assets
import pytest
import requests
from harness import ComfyServer, image_size

pytestmark = [pytest.mark.browser, pytest.mark.host]

MAIN = "lidit_paper_pipeline"
SCREENSHOT = harness.REPO_ROOT / "docs" / "workflow.png"
#: frontend settings for a readable screenshot: full detail at any zoom, no minimap or stats overlay
SETTINGS = {"LiteGraph.Canvas.MinFontSizeForLOD": 1, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}
UI_FILES = sorted(graphs.WORKFLOWS.glob("*.json"))


@pytest.fixture(scope="module")
def loaded(comfy_server: ComfyServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """{workflow stem: load_workflows.mjs result}, with the model names the workflows use installed
    (so the model combos hold them, as on a user's machine)."""
    lidit_assets.provision(comfy_server.models_dir)
    for key, value in SETTINGS.items():
        requests.post(f"{comfy_server.url}/api/settings/{key}", json=value, timeout=30).raise_for_status()
    out = tmp_path_factory.mktemp("workflows_browser")
    result = harness.load_workflows(comfy_server.url, UI_FILES, out / "result.json", screenshot_dir=out)
    if os.environ.get("LIDIT_UPDATE_SNAPSHOTS") == "1" or not SCREENSHOT.exists():
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(out / f"{MAIN}.png", SCREENSHOT)
    return {Path(file).stem: entry for file, entry in result.items()}


@pytest.mark.parametrize("ui", UI_FILES, ids=lambda p: p.stem)
def test_workflow_loads_cleanly_and_converts_to_its_api_twin(ui: Path, loaded: dict[str, dict]) -> None:
    entry = loaded[ui.stem]
    assert entry["missing"] == [] and entry["errors"] == [], entry
    got = {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in entry["output"].items()}
    want = {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in graphs.load(ui.stem).items()}
    assert got == want


def test_converted_main_workflow_runs(loaded: dict[str, dict], comfy_server: ComfyServer) -> None:
    _, entry = comfy_server.run(graphs.fresh(loaded[MAIN]["output"]), timeout=300)
    [png] = comfy_server.output_images(entry)
    assert png.suffix == ".png"


def test_readme_screenshot_exists(loaded: dict[str, dict]) -> None:
    assert image_size(SCREENSHOT) == (1600, 1000)
