"""Smoke tests of the harness itself, with stock nodes only (no pack needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import ComfyServer, PromptRejected, image_size

pytestmark = pytest.mark.host


def empty_image_prompt(width: int, height: int, color: int, prefix: str) -> dict:
    """EmptyImage -> SaveImage; ``color`` makes the prompt unique so nothing comes from cache."""
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": width, "height": height, "batch_size": 1, "color": color}},
        "2": {"class_type": "SaveImage",
              "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def test_server_is_up(comfy_server: ComfyServer) -> None:
    stats = comfy_server.get("/system_stats")
    assert stats["system"]["comfyui_version"]
    info = comfy_server.object_info("SaveImage")
    assert "images" in info["input"]["required"]


def test_empty_image_to_png(comfy_server: ComfyServer) -> None:
    pid = comfy_server.queue(empty_image_prompt(96, 40, 0x3366CC, "harness_smoke"))
    entry = comfy_server.wait(pid, timeout=120)
    [png] = comfy_server.output_images(entry, node_id="2")
    assert png.suffix == ".png" and png.is_file()
    assert image_size(png) == (96, 40)
    types = comfy_server.event_types(pid)
    assert types[0] == "execution_start", types
    assert "execution_success" in types, types
    assert types.index("executed") < types.index("execution_success"), types
    executed = comfy_server.wait_event(pid, "executed")
    assert executed["data"]["node"] == "2"
    assert executed["data"]["output"]["images"][0]["filename"] == png.name


def test_cached_rerun_reports_execution_cached(comfy_server: ComfyServer) -> None:
    prompt = empty_image_prompt(16, 16, 0x112233, "harness_cache")
    comfy_server.run(prompt)
    pid, _ = comfy_server.run(prompt)
    cached = comfy_server.wait_event(pid, "execution_cached")
    assert "1" in cached["data"]["nodes"]


def test_validation_error_is_rejected(comfy_server: ComfyServer) -> None:
    bad = empty_image_prompt(16, 16, 0, "harness_bad")
    del bad["1"]["inputs"]["width"]
    with pytest.raises(PromptRejected) as err:
        comfy_server.queue(bad)
    assert "1" in err.value.node_errors


def combo_options(spec: list) -> list[str]:
    """Options of a combo input spec: old style ``[[...], {...}]`` or ``["COMBO", {"options": [...]}]``."""
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def test_model_folders_are_registered_and_rescanned(comfy_server: ComfyServer, comfy_models_dir: Path) -> None:
    for key in ("diffusion_models", "LLM"):
        assert f"Adding extra search path {key} {comfy_models_dir / key}" in comfy_server.log_text()
    # a file dropped in after start is listed: ComfyUI re-lists a folder whose mtime changed
    (comfy_models_dir / "vae" / "harness_dummy.safetensors").write_bytes(b"\0" * 16)
    spec = comfy_server.object_info("VAELoader")["input"]["required"]["vae_name"]
    assert "harness_dummy.safetensors" in combo_options(spec)


def test_interrupt_with_nothing_running_is_harmless(comfy_server: ComfyServer) -> None:
    comfy_server.interrupt()
    comfy_server.interrupt("not-a-running-prompt")
    _, entry = comfy_server.run(empty_image_prompt(8, 8, 0x445566, "harness_after_interrupt"))
    assert entry["status"]["status_str"] == "success"
