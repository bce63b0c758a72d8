"""API-format graphs for the host tests: the workflows' twins and the facts a test checks on them."""
from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

from harness import REPO_ROOT

from lidit.config import LIDiTConfig

WORKFLOWS = REPO_ROOT / "workflows"
API_DIR = WORKFLOWS / "api"
SEED_INPUTS = ("seed", "noise_seed")
SAMPLER_TYPES = ("LIDiTSampler", "KSampler", "KSamplerAdvanced", "SamplerCustomAdvanced")
_seeds = itertools.count(1000)

Graph = dict[str, Any]


def api_twins() -> list[Path]:
    return sorted(API_DIR.glob("*.json"))


def load(name: str) -> Graph:
    return json.loads((API_DIR / f"{name}.json").read_text())


def fresh(graph: Graph) -> Graph:
    """A copy with new seeds everywhere, so the samplers re-run instead of coming from the cache."""
    graph = copy.deepcopy(graph)
    seed = next(_seeds)
    for node in graph.values():
        for key in SEED_INPUTS:
            if key in node["inputs"]:
                node["inputs"][key] = seed
    return graph


def find(graph: Graph, class_type: str) -> list[str]:
    return [nid for nid, node in graph.items() if node["class_type"] == class_type]


def source(graph: Graph, nid: str, name: str) -> str:
    return str(graph[nid]["inputs"][name][0])


def checkpoint_of(graph: Graph, nid: str) -> str:
    """The checkpoint (or pathway file) a sampler's MODEL comes from, through guiders and model patches."""
    while graph[nid]["class_type"] not in ("LIDiTLoader", "LIDiTFromPixArt"):
        nid = source(graph, nid, "model" if "model" in graph[nid]["inputs"] else "guider")
    inputs = graph[nid]["inputs"]
    return inputs.get("ckpt_name") or inputs["pathway_name"]


def sampler_steps(graph: Graph, nid: str, config: LIDiTConfig) -> int:
    """How many steps (progress events) a sampler node runs."""
    node = graph[nid]
    if node["class_type"] == "SamplerCustomAdvanced":
        return graph[source(graph, nid, "sigmas")]["inputs"]["steps"]
    if node["class_type"] == "KSamplerAdvanced":
        inputs = node["inputs"]
        return min(inputs["end_at_step"], inputs["steps"]) - inputs["start_at_step"]
    return node["inputs"]["steps"] or config.steps


def image_size(graph: Graph, nid: str, config: LIDiTConfig) -> tuple[int, int]:
    """(width, height) of the image that a node's output becomes, found by walking back to
    whatever fixed the size. Only the 1:1 preset is computed here (it is the training size)."""
    node = graph[nid]
    inputs = node["inputs"]
    if node["class_type"] in ("EmptyChromaRadianceLatentImage", "EmptyImage"):
        return inputs["width"], inputs["height"]
    if node["class_type"] == "LatentUpscaleBy":  # (pixel-space latents: LatentUpscale assumes an 8x VAE)
        width, height = image_size(graph, source(graph, nid, "samples"), config)
        return round(width * inputs["scale_by"]), round(height * inputs["scale_by"])
    if node["class_type"] == "LIDiTSampler":
        if inputs["width"] and inputs["height"]:
            return inputs["width"], inputs["height"]
        assert inputs["resolution"] == "1:1" and not inputs["width"] and not inputs["height"], inputs
        return config.resolution, config.resolution
    for key in ("images", "samples", "latent_image", "pixels"):
        if isinstance(inputs.get(key), list):
            return image_size(graph, source(graph, nid, key), config)
    raise AssertionError(f"cannot tell the image size at node {nid} ({node['class_type']})")


def progress_by_node(events: list[dict[str, Any]]) -> dict[str, list[tuple[int, int]]]:
    """(value, max) of every websocket `progress` event, per node id."""
    out: dict[str, list[tuple[int, int]]] = {}
    for e in events:
        if e["type"] == "progress":
            out.setdefault(str(e["data"]["node"]), []).append((e["data"]["value"], e["data"]["max"]))
    return out
