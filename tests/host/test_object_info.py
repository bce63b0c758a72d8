"""The pack's node definitions, as the server publishes them, are API: saved workflows store
widget values by position. A snapshot makes any change to node ids, inputs, their order, types,
defaults or ranges fail here, so it can only happen on purpose.

After a deliberate change (new widgets go at the end of a node's inputs only):
    LIDIT_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest -q tests/host/test_object_info.py
then review and commit tests/host/object_info_snapshot.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from harness import ComfyServer

SNAPSHOT = Path(__file__).with_name("object_info_snapshot.json")
PREFIX = "LIDiT"
#: combos whose options are the user's files or ComfyUI's own lists, not the pack's API
HOST_LISTS = {"llm_name", "ckpt_name", "pathway_name", "sampler_name", "scheduler"}


def pack_nodes(object_info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in object_info.items() if v.get("python_module") == "custom_nodes.ComfyUI-LI-DiT"}


def stable_view(info: dict[str, Any]) -> dict[str, Any]:
    """The parts that saved workflows and users depend on; tooltips and descriptions may change."""
    def spec(name: str, s: list | str) -> list:
        if isinstance(s, str):  # a hidden input: the host's value (PROMPT, UNIQUE_ID)
            return [s, {}]
        kind = "COMBO(host list)" if name in HOST_LISTS else s[0]
        opts = {k: v for k, v in (s[1] if len(s) > 1 else {}).items() if k != "tooltip"}
        return [kind, opts]

    return {
        "display_name": info["display_name"],
        "category": info["category"],
        "inputs": {section: [[name, *spec(name, info["input"][section][name])] for name in names]
                   for section, names in info["input_order"].items()},
        "outputs": list(zip(info["output"], info["output_name"])),
        "output_node": info["output_node"],
    }


def dump(obj: Any, indent: str = "") -> str:
    """JSON with anything short on one line, so a changed input is a one-line diff."""
    flat = json.dumps(obj)
    if len(indent) + len(flat) <= 110 or not isinstance(obj, (dict, list)) or not obj:
        return flat
    inner = indent + "  "
    items = ([f"{inner}{json.dumps(k)}: {dump(v, inner)}" for k, v in obj.items()] if isinstance(obj, dict)
             else [inner + dump(v, inner) for v in obj])
    brackets = "{}" if isinstance(obj, dict) else "[]"
    return brackets[0] + "\n" + ",\n".join(items) + "\n" + indent + brackets[1]


def test_node_definitions_match_the_snapshot(comfy_server: ComfyServer) -> None:
    got = {name: stable_view(info) for name, info in sorted(pack_nodes(comfy_server.object_info()).items())}
    if os.environ.get("LIDIT_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(dump(got) + "\n")
    want = json.loads(SNAPSHOT.read_text())
    assert got.keys() == want.keys(), "node ids changed: renaming or removing a node breaks saved workflows"
    for name in want:
        assert json.loads(json.dumps(got[name])) == want[name], (
            f"{name} changed; if deliberate, see this module's docstring")


def test_every_node_is_prefixed_named_and_every_input_has_a_tooltip(comfy_server: ComfyServer) -> None:
    nodes = pack_nodes(comfy_server.object_info())
    assert set(nodes) == set(json.loads(SNAPSHOT.read_text()))
    for name, info in nodes.items():
        assert name.startswith(PREFIX) and info["display_name"].startswith("LI-DiT "), name
        assert info["description"], name
        for kind, section in info["input"].items():
            if kind == "hidden":  # the host's values (PROMPT, UNIQUE_ID), no widgets
                continue
            for input_name, s in section.items():
                assert s[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
