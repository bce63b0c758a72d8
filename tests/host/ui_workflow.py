"""Make a UI-format workflow (what the frontend saves and loads) from an API-format one.

Why: UI workflows store widget values by position, so hand-written ones drift silently when
a node's widgets change. The API twins in workflows/api/ are the source; this derives each UI
workflow from its twin and the server's /object_info (widget order, seed controls, sockets),
and lays the graph out left to right. The browser test checks the other direction: the real
frontend turns every UI workflow back into exactly its API twin.

Regenerate after changing a twin or a node's inputs (needs the host test server):
    LIDIT_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest -q tests/host/test_workflows.py -k ui
"""
from __future__ import annotations

import uuid
from typing import Any

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
#: the frontend adds a control widget ("fixed", "randomize", ...) after these
SEED_NAMES = ("seed", "noise_seed")
VIEW = (1600, 1000)        # the browser test's viewport, in screen pixels
LEFT, TOP, EDGE = 75, 110, 20  # room for the frontend's side bar, tab bar and Run button
COLUMN_GAP, ROW_GAP, TITLE = 60, 36, 30


def input_specs(info: dict[str, Any]) -> list[tuple[str, list]]:
    """(name, spec) of every input in the order the frontend shows them."""
    order = info.get("input_order") or {s: list(v) for s, v in info["input"].items()}
    return [(name, info["input"][section][name]) for section in ("required", "optional")
            for name in order.get(section, [])]


def is_widget(spec: list) -> bool:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def widget_height(spec: list) -> int:
    opts = spec[1] if len(spec) > 1 else {}
    return 64 if spec[0] == "STRING" and opts.get("multiline") else 24


def node_size(info: dict[str, Any], class_type: str) -> list[int]:
    specs = input_specs(info)
    sockets = sum(not is_widget(s) for _, s in specs)
    widgets = [s for _, s in specs if is_widget(s)]
    multiline = any(widget_height(s) > 24 for s in widgets)
    height = 10 + 22 * max(sockets, len(info["output"]), 1) + sum(widget_height(s) for s in widgets)
    height += 24 * sum(1 for name, s in specs if is_widget(s) and seeded(name, s))
    if class_type in ("SaveImage", "PreviewImage"):
        height += 220
    return [360 if multiline else 300, height]


def seeded(name: str, spec: list) -> bool:
    opts = spec[1] if len(spec) > 1 else {}
    return spec[0] == "INT" and (opts.get("control_after_generate") or name in SEED_NAMES)


def columns(api: dict[str, Any]) -> dict[str, int]:
    """Left-to-right layer of each node, placed as late as its consumers allow (by its longest
    path to an output), so loaders and patches stand right before what they feed."""
    consumers: dict[str, list[str]] = {nid: [] for nid in api}
    for nid, node in api.items():
        for value in node["inputs"].values():
            if isinstance(value, list):
                consumers[str(value[0])].append(nid)
    to_sink: dict[str, int] = {}

    def height(nid: str) -> int:
        if nid not in to_sink:
            to_sink[nid] = 1 + max((height(c) for c in consumers[nid]), default=-1)
        return to_sink[nid]

    last = max(height(nid) for nid in api)
    return {nid: last - to_sink[nid] for nid in api}


def api_to_ui(api: dict[str, Any], object_info: dict[str, Any], name: str) -> dict[str, Any]:
    col = columns(api)
    ids = sorted(api, key=int)
    nodes: dict[str, dict[str, Any]] = {}
    links: list[list[Any]] = []
    for nid in ids:
        node, info = api[nid], object_info[api[nid]["class_type"]]
        widgets, inputs = [], []
        for input_name, spec in input_specs(info):
            value = node["inputs"].get(input_name)
            if is_widget(spec):
                if isinstance(value, list):
                    raise ValueError(f"node {nid}: widget {input_name!r} is linked; not supported here")
                widgets.append(value)
                if seeded(input_name, spec):
                    widgets.append("fixed")
            else:
                inputs.append({"name": input_name, "type": spec[0], "link": None})
        ui = {"id": int(nid), "type": node["class_type"], "pos": [0, 0],
              "size": node_size(info, node["class_type"]), "flags": {}, "order": 0, "mode": 0,
              "inputs": inputs,
              "outputs": [{"name": out_name, "type": out_type, "links": [], "slot_index": i}
                          for i, (out_type, out_name) in enumerate(zip(info["output"], info["output_name"]))],
              "properties": {"Node name for S&R": node["class_type"]},
              "widgets_values": widgets}
        if "title" in node.get("_meta", {}):
            ui["title"] = node["_meta"]["title"]
        nodes[nid] = ui
    for nid in ids:  # links, in a stable order: by target node, then input
        for slot, socket in enumerate(nodes[nid]["inputs"]):
            value = api[nid]["inputs"].get(socket["name"])
            if value is None:
                continue
            src, src_slot = str(value[0]), int(value[1])
            link_id = len(links) + 1
            out_type = nodes[src]["outputs"][src_slot]["type"]
            links.append([link_id, int(src), src_slot, int(nid), slot, out_type])
            socket["link"] = link_id
            nodes[src]["outputs"][src_slot]["links"].append(link_id)
    for order, nid in enumerate(sorted(ids, key=lambda n: (col[n], int(n)))):
        nodes[nid]["order"] = order
    x = 0
    for c in sorted(set(col.values())):
        members = [n for n in ids if col[n] == c]
        y = 0
        for nid in members:
            nodes[nid]["pos"] = [x, y]
            y += nodes[nid]["size"][1] + TITLE + ROW_GAP
        x += max(nodes[n]["size"][0] for n in members) + COLUMN_GAP
    width = x - COLUMN_GAP
    height = max(n["pos"][1] + n["size"][1] for n in nodes.values()) + TITLE
    scale = round(min(1.0, (VIEW[0] - LEFT - EDGE) / width, (VIEW[1] - TOP - EDGE) / height), 3)
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-lidit/{name}")),
        "revision": 0,
        "last_node_id": max(map(int, ids)),
        "last_link_id": len(links),
        "nodes": [nodes[n] for n in ids],
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": scale, "offset": [round(LEFT / scale), round(TOP / scale + TITLE)]}},
        "version": 0.4,
    }


def semantics(ui: dict[str, Any]) -> dict[str, Any]:
    """What must match between a UI workflow and the one generated from its twin (not the layout)."""
    return {
        "nodes": {n["id"]: (n["type"], n.get("title"), n["widgets_values"],
                            [(i["name"], i["type"], i["link"]) for i in n["inputs"]],
                            [(o["name"], o["type"], sorted(o["links"] or [])) for o in n["outputs"]])
                  for n in ui["nodes"]},
        "links": sorted(map(tuple, ui["links"])),
    }
