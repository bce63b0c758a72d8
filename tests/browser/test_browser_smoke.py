"""The browser harness works: a stock UI workflow loads in the real frontend, converts to
the API prompt we expect, and that prompt runs on the server."""

from __future__ import annotations

from pathlib import Path

import harness
import pytest
from harness import ComfyServer, image_size

pytestmark = [pytest.mark.browser, pytest.mark.host]

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def loaded(comfy_server: ComfyServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("browser")
    files = [FIXTURES / "stock_empty_image.json", FIXTURES / "missing_node.json"]
    result = harness.load_workflows(comfy_server.url, files, out / "result.json", screenshot_dir=out / "shots")
    return result, out / "shots"


def test_stock_workflow_converts_to_api(loaded: tuple[dict, Path]) -> None:
    result, _ = loaded
    entry = result[str(FIXTURES / "stock_empty_image.json")]
    assert entry["errors"] == [] and entry["missing"] == []
    api = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in entry["output"].items()}
    assert api == {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 80, "height": 48, "batch_size": 1, "color": 0xFF0000}},
        "2": {"class_type": "SaveImage",
              "inputs": {"filename_prefix": "browser_smoke", "images": ["1", 0]}},
    }


def test_converted_prompt_runs(loaded: tuple[dict, Path], comfy_server: ComfyServer) -> None:
    result, _ = loaded
    output = result[str(FIXTURES / "stock_empty_image.json")]["output"]
    _, entry = comfy_server.run(output)
    [png] = comfy_server.output_images(entry)
    assert image_size(png) == (80, 48)


def test_missing_node_is_reported(loaded: tuple[dict, Path]) -> None:
    result, _ = loaded
    entry = result[str(FIXTURES / "missing_node.json")]
    assert entry["missing"] == ["LIDiT_NodeThatDoesNotExist"]


def test_screenshot_written(loaded: tuple[dict, Path]) -> None:
    _, shots = loaded
    assert image_size(shots / "stock_empty_image.png") == (1600, 1000)
