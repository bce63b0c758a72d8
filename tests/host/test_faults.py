"""Bad input and faults: every case gets a clear error or is stopped on request, and the server
keeps serving. In-process where no server is needed (sizes, interrupts), on the real server for
what a user sees (broken files, absurd configs, stock conditioning nodes)."""
from __future__ import annotations

import re
import shutil

import inproc
import lidit_assets as assets
import pytest
import torch
from safetensors.torch import save_file
from test_nodes import DIT, FUSE_NEG, FUSE_POS, SAMPLER, SMOL_LOADER, assert_still_serving, failure, paper

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(pack, tiny_pack_assets):
    build = inproc.sub("nodes.host_model").build_lidit
    return {"model": build(str(tiny_pack_assets["checkpoint"]), torch.float32, None, CPU),
            "llms": inproc.load_llms(tiny_pack_assets["llms"])}


# ----------------------------------------------------------------------------- sizes and memory
def test_memory_estimate_is_lidits_own_and_grows_with_tokens(tiny) -> None:
    model = tiny["model"].model
    small, big = (model.memory_required([2, 3, side, side]) for side in (64, 512))
    default = super(type(model), model).memory_required([2, 3, 512, 512])
    assert 0 < small < big < default / 100  # ComfyUI's default formula would say ~240 GB here


def test_a_size_that_cannot_fit_is_refused_with_the_estimate_and_the_largest_size(tiny, monkeypatch) -> None:
    import comfy.model_management as mm

    model = tiny["model"].model
    monkeypatch.setattr(mm, "get_total_memory", lambda *a, **k: 2 * 2**30)  # a 2 GiB device
    with pytest.raises(ValueError, match=r"16384x16384 at batch 1 needs about [\d.]+ GiB for one forward, more than "
                                         r"the 2.0 GiB of cpu\. The largest square size that fits is about (\d+)x\1") as e:
        model.check_size((1, 3, 16384, 16384), CPU)
    side = int(re.search(r"fits is about (\d+)x", str(e.value)).group(1))
    model.check_size((1, 3, side, side), CPU)  # the size it names does fit
    with pytest.raises(ValueError):
        model.check_size((1, 3, side + 8, side + 8), CPU)


def test_big_attention_runs_in_chunks_and_stops_on_interrupt(pack, monkeypatch) -> None:
    import comfy.ldm.modules.attention as attention
    import comfy.model_management as mm

    attn = inproc.sub("nodes.attention")
    calls = []
    original = attention.optimized_attention
    monkeypatch.setattr(attention, "optimized_attention", lambda q, *a, **k: calls.append(q.shape[2]) or original(q, *a, **k))
    monkeypatch.setattr(attn, "CHUNK_SCORES", 4096)
    q, k, v = (torch.randn(1, 2, 256, 8) for _ in range(3))
    attend = attn.host_attend({}, depth=2)
    out = attend(q, k, v, None, ("dit", 0, "self"))
    assert calls == [8] * 32  # 4096 scores a call: 8 queries x 256 keys x 2 heads
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
    seen = []

    def interrupt_after_three(q, *a, **kw):
        seen.append(1)
        if len(seen) == 3:
            mm.interrupt_current_processing(True)
        return original(q, *a, **kw)
    monkeypatch.setattr(attention, "optimized_attention", interrupt_after_three)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            attend(q, k, v, None, ("dit", 0, "self"))
    finally:
        mm.interrupt_current_processing(False)
    assert len(seen) == 3  # stopped at the next chunk, not after all 32


def interrupt_inside(module: torch.nn.Module, finished: list) -> torch.utils.hooks.RemovableHandle:
    """Request an interrupt while `module` runs (as POST /interrupt would), recording that it finished."""
    import comfy.model_management as mm

    def hook(*_):
        finished.append(module)
        mm.interrupt_current_processing(True)
    return module.register_forward_hook(hook)


def test_sampling_stops_at_the_next_block_on_interrupt(tiny) -> None:
    import comfy.model_management as mm

    cond = inproc.conditioning(tiny["model"], tiny["llms"], "a red circle")
    blocks = tiny["model"].model.diffusion_model.dit.blocks
    finished = []
    handles = [interrupt_inside(blocks[0], finished), blocks[1].register_forward_hook(lambda *_: finished.append(1))]
    try:
        with pytest.raises(mm.InterruptProcessingException):
            inproc.ksample(tiny["model"], cond, cond, steps=2)
    finally:
        for handle in handles:
            handle.remove()
        mm.interrupt_current_processing(False)
    assert finished == [blocks[0]]  # the first step's block 0, and nothing after it


def test_llm_encoding_stops_between_layers_on_interrupt(tiny) -> None:
    """A 4,000-token prompt runs its LLM for a while: the encode node checks before every layer."""
    import comfy.model_management as mm

    llm = tiny["llms"][0]
    encode = inproc.sub("nodes.encode").LIDiTInstructedEncode()
    encode.encode(llm, "warm up", "paper", "", "", True, -3, 4000)  # cut and loaded for layer -3
    layers = llm.llm.model.layers
    finished = []
    handles = [interrupt_inside(layers[0], finished), layers[1].register_forward_hook(lambda *_: finished.append(1))]
    try:
        with pytest.raises(mm.InterruptProcessingException):
            encode.encode(llm, "a red circle " * 1300, "paper", "", "", True, -3, 4000)
    finally:
        for handle in handles:
            handle.remove()
        mm.interrupt_current_processing(False)
    assert finished == [layers[0]]


def test_llm_encode_calls_its_check_before_every_layer_it_computes(pack, tiny_pack_assets) -> None:
    lidit_llm, instruction = inproc.sub("lidit.llm"), inproc.sub("lidit.instruction")
    llm = inproc.load_llms(tiny_pack_assets["llms"])[0].llm
    checks = []
    lidit_llm.encode(llm, ["a red circle"], instruction.PromptTemplate(), 64, -3, check=lambda: checks.append(1))
    assert len(checks) == lidit_llm.layers_needed(llm.total_layers, -3) == 2


# ----------------------------------------------------------------------------- on the real server
def test_stock_conditioning_nodes_that_rewrite_the_tensor_are_refused(comfy_server, lidit_assets) -> None:
    """ConditioningAverage keeps the `to` extras and blends or cuts `from` into it: without a check
    the branches mix silently. Different lengths and equal lengths (a blend) alike."""
    for other in ("a blue square", "a green triangle and a white circle and an orange square"):
        graph = paper(steps=1)
        graph["40"] = {**graph["3"], "inputs": {**graph["3"]["inputs"], "text": other}}
        graph["41"] = {**graph["4"], "inputs": {**graph["4"]["inputs"], "text": other}}
        graph["42"] = {"class_type": "LIDiTTokenRefiner", "inputs": {"text": ["40", 0], "refiner_index": -1}}
        graph["43"] = {"class_type": "LIDiTTokenRefiner", "inputs": {"text": ["41", 0], "refiner_index": -1}}
        graph["44"] = {"class_type": "LIDiTCollaborativeFusion",
                       "inputs": {"model": [DIT, 0], "branch_1": ["42", 0], "branch_2": ["43", 0]}}
        graph["45"] = {"class_type": "ConditioningAverage", "inputs": {
            "conditioning_to": [FUSE_POS, 0], "conditioning_from": ["44", 0], "conditioning_to_strength": 0.5}}
        graph[SAMPLER]["inputs"]["positive"] = ["45", 0]
        error = failure(comfy_server, graph)
        assert error["node_id"] == SAMPLER, error
        message = error["exception_message"]
        assert "changed the LI-DiT conditioning's tensor" in message and "ConditioningAverage" in message
        assert "use ConditioningCombine" in message
    combined = paper(steps=1)  # what the error recommends works
    combined["46"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": [FUSE_POS, 0],
                                                                      "conditioning_2": [FUSE_NEG, 0]}}
    combined[SAMPLER]["inputs"]["positive"] = ["46", 0]
    comfy_server.run(combined, timeout=120)


def test_zeroed_conditioning_is_not_mistaken_for_a_rewrite(comfy_server, lidit_assets) -> None:
    graph = paper(steps=1)
    graph["47"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": [FUSE_NEG, 0]}}
    graph[SAMPLER]["inputs"]["negative"] = ["47", 0]
    comfy_server.run(graph, timeout=120)


def broken_files(folder, good) -> dict[str, str]:
    """name -> what its error must say; written into the server's diffusion_models folder."""
    import io
    import json

    from PIL import Image

    data = good.read_bytes()
    (folder / "lidit-truncated.safetensors").write_bytes(data[:-1000])
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    (folder / "lidit-png.safetensors").write_bytes(png.getvalue())
    (folder / "lidit-hugeheader.safetensors").write_bytes((2**60).to_bytes(8, "little") + b"{}")
    save_file({"w": torch.zeros(1)}, str(folder / "lidit-badjson.safetensors"), metadata={"lidit_config": "{oops"})
    config = json.loads(inproc.sub("lidit.checkpoint").read_config(good).to_json())
    config["dit"]["hidden"] = 10**9
    save_file({"w": torch.zeros(1)}, str(folder / "lidit-absurd.safetensors"), metadata={"lidit_config": json.dumps(config)})
    return {"lidit-truncated.safetensors": "lidit-truncated.safetensors is truncated",
            "lidit-png.safetensors": "lidit-png.safetensors is not a safetensors file",
            "lidit-hugeheader.safetensors": "lidit-hugeheader.safetensors is not a safetensors file",
            "lidit-badjson.safetensors": "the 'lidit_config' in its metadata is invalid: JSONDecodeError",
            "lidit-absurd.safetensors": "config field dit.hidden = 1000000000 is out of range"}


def test_broken_and_absurd_checkpoints_get_errors_that_name_the_file(pack, comfy_server, comfy_models_dir,
                                                                     lidit_assets) -> None:
    for name, says in broken_files(comfy_models_dir / "diffusion_models", lidit_assets.checkpoints[assets.DEMO]).items():
        graph = paper(steps=1)
        graph[DIT]["inputs"]["ckpt_name"] = name
        error = failure(comfy_server, graph)
        assert error["node_id"] == DIT and says in error["exception_message"], (name, error["exception_message"])
    assert_still_serving(comfy_server)


def test_an_llm_folder_without_tokenizer_files_says_what_to_copy(comfy_server, comfy_models_dir, lidit_assets) -> None:
    folder = comfy_models_dir / "LLM" / "no-tokenizer"
    if not folder.exists():
        shutil.copytree(lidit_assets.llm_dirs[assets.SMOL], folder)
        for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / file).unlink(missing_ok=True)
    graph = paper(steps=1)
    graph[SMOL_LOADER]["inputs"]["llm_name"] = "no-tokenizer"
    error = failure(comfy_server, graph)
    assert error["node_id"] == SMOL_LOADER and "has no tokenizer files" in error["exception_message"]
    assert_still_serving(comfy_server)


def test_a_size_beyond_the_device_is_refused_by_the_sampler_before_allocating(comfy_server, lidit_assets) -> None:
    graph = paper(width=16384, height=16384, batch_size=64)
    error = failure(comfy_server, graph)
    assert error["node_id"] == SAMPLER and "16384x16384 at batch 64 needs about" in error["exception_message"]
    assert "The largest square size that fits is about" in error["exception_message"]
    assert_still_serving(comfy_server)


def test_interrupt_stops_a_huge_image_within_seconds(comfy_server, lidit_assets) -> None:
    import time

    pid = comfy_server.queue(paper(width=4096, height=4096, steps=2))
    deadline = time.monotonic() + 120
    while not any(e["type"] == "executing" and e["data"].get("node") == SAMPLER for e in comfy_server.events(pid)):
        assert time.monotonic() < deadline, comfy_server.event_types(pid)
        time.sleep(0.2)
    time.sleep(3)  # inside the first forward: 262,144 tokens of attention
    asked = time.monotonic()
    comfy_server.interrupt()
    entry = comfy_server.wait(pid, timeout=120, check=False)
    assert "execution_interrupted" in comfy_server.event_types(pid), entry["status"]
    assert time.monotonic() - asked < 30
    assert_still_serving(comfy_server)


def test_the_main_workflow_runs_with_the_network_blocked(comfy_server, lidit_assets) -> None:
    """The whole host ring runs behind the guard; here the main workflow, from loading the LLMs
    and the checkpoint (fresh: new dtypes) to the image, must not even try a connection."""
    assert "LIDIT-NETWORK-GUARD active" in comfy_server.log_text()
    graph = paper(steps=2)
    for loader in ("1", "2"):
        graph[loader]["inputs"]["dtype"] = "bf16"
    graph[DIT]["inputs"]["weight_dtype"] = "bf16"
    mark = comfy_server.log_size()
    comfy_server.run(graph, timeout=180)
    assert "LIDIT-NETWORK-BLOCKED" not in comfy_server.log_text(since=mark)


def test_the_network_guard_refuses_and_reports_outside_connections(tmp_path) -> None:
    import os
    import subprocess
    import sys

    code = ("import socket\n"
            "for where in (('192.0.2.1', 80), ('huggingface.co', 443)):\n"
            "    try: socket.create_connection(where, timeout=1)\n"
            "    except OSError as e: print('refused', where[0])\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); socket.create_connection(s.getsockname())\n"
            "print('loopback ok')\n")
    guard = str(inproc.REPO_ROOT / "tests" / "host" / "netguard")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=guard))
    assert run.stdout.split("\n")[:3] == ["refused 192.0.2.1", "refused huggingface.co", "loopback ok"], run
    assert run.stderr.count("LIDIT-NETWORK-BLOCKED") == 2
