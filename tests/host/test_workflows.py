"""Every example workflow runs on the real server, and its UI file matches its API twin."""
from __future__ import annotations

import json
import os
from pathlib import Path

import graphs
import pytest
import ui_workflow
from harness import ComfyServer, image_size

TWINS = graphs.api_twins()


def test_the_example_workflows_each_have_a_ui_file() -> None:
    names = {p.stem for p in TWINS}
    assert {"lidit_paper_pipeline", "lidit_one_llm", "lidit_stock_nodes", "lidit_comfy_text_encoder", "lidit_emoji"} <= names
    assert names == {p.stem for p in graphs.WORKFLOWS.glob("*.json")}


@pytest.mark.parametrize("twin", TWINS, ids=lambda p: p.stem)
def test_workflow_runs_and_saves_an_image_of_the_requested_size(
        twin: Path, comfy_server: ComfyServer, lidit_assets) -> None:
    graph = graphs.fresh(json.loads(twin.read_text()))
    pid, entry = comfy_server.run(graph, timeout=300)
    types = comfy_server.event_types(pid)
    assert "execution_success" in types and "execution_error" not in types, types
    [save] = graphs.find(graph, "SaveImage")
    [png] = comfy_server.output_images(entry, node_id=save)
    sampler = graphs.source(graph, graphs.source(graph, save, "images"), "samples")
    config = lidit_assets.config(graphs.checkpoint_of(graph, sampler))
    assert image_size(png) == graphs.image_size(graph, save, config)
    progress = graphs.progress_by_node(comfy_server.events(pid))
    samplers = [nid for t in graphs.SAMPLER_TYPES for nid in graphs.find(graph, t)]
    assert samplers
    for nid in samplers:
        steps = graphs.sampler_steps(graph, nid, lidit_assets.config(graphs.checkpoint_of(graph, nid)))
        assert progress.get(nid) == [(i, steps) for i in range(1, steps + 1)], (nid, progress)


@pytest.mark.parametrize("twin", TWINS, ids=lambda p: p.stem)
def test_ui_workflow_is_the_one_generated_from_its_api_twin(twin: Path, comfy_server: ComfyServer) -> None:
    """Widget positions come from /object_info, never by hand. To regenerate after changing a
    twin or a node: LIDIT_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest -q tests/host/test_workflows.py -k ui"""
    object_info = comfy_server.object_info()
    want = ui_workflow.api_to_ui(json.loads(twin.read_text()), object_info, twin.stem)
    path = graphs.WORKFLOWS / twin.name
    if os.environ.get("LIDIT_UPDATE_SNAPSHOTS") == "1":
        path.write_text(json.dumps(want, indent=1) + "\n")
    assert ui_workflow.semantics(json.loads(path.read_text())) == ui_workflow.semantics(want), (
        f"{path} no longer matches {twin}; regenerate it (see this test's docstring)")


def test_template_browser_lists_each_workflow_once(comfy_server: ComfyServer) -> None:
    """ComfyUI 0.3.75 reads a pack's `workflows/` (as well as `example_workflows/`) for its
    Template Browser (app/custom_node_manager.py), top level only: the UI files are listed and
    the API twins in workflows/api/ are not. An `example_workflows` link to it would list every
    workflow twice."""
    assert not (graphs.REPO_ROOT / "example_workflows").exists()
    templates = comfy_server.get("/api/workflow_templates")
    assert sorted(templates["ComfyUI-LI-DiT"]) == sorted(p.stem for p in TWINS)
    served = comfy_server.get("/api/workflow_templates/ComfyUI-LI-DiT/lidit_paper_pipeline.json")
    assert served == json.loads((graphs.WORKFLOWS / "lidit_paper_pipeline.json").read_text())
