"""The pack's nodes on the real server: correctness against lidit, stock-node interplay,
caching, interrupt, and the errors a user sees for a bad graph."""
from __future__ import annotations

import graphs
import lidit_assets as assets
import numpy as np
import pytest
import torch
from harness import ComfyServer, PromptRejected, image_size
from PIL import Image
from safetensors.torch import load_file, save_file

from lidit.checkpoint import load_checkpoint, read_config
from lidit.diffusion import sample
from lidit.instruction import PromptTemplate
from lidit.llm import encode, load_llm

# node ids in workflows/api/lidit_paper_pipeline.json
SMOL_LOADER, GEMMA_LOADER = "1", "2"
POS_SMOL, POS_GEMMA = "3", "4"
REF_POS_SMOL, REF_POS_GEMMA = "7", "8"
DIT, FUSE_POS, FUSE_NEG, SAMPLER, VAE, DECODE, SAVE = "11", "12", "13", "14", "15", "16", "17"


def paper(**sampler_inputs) -> graphs.Graph:
    graph = graphs.fresh(graphs.load("lidit_paper_pipeline"))
    graph[SAMPLER]["inputs"].update(sampler_inputs)
    return graph


def add_output(graph: graphs.Graph, nid: str, latent: list, prefix: str) -> str:
    """Decode a LATENT output (pixel space) and save it; returns the save node's id."""
    graph[f"{nid}d"] = {"class_type": "VAEDecode", "inputs": {"samples": latent, "vae": [VAE, 0]}}
    graph[f"{nid}s"] = {"class_type": "SaveImage", "inputs": {"images": [f"{nid}d", 0], "filename_prefix": prefix}}
    return f"{nid}s"


def png_array(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def failure(server: ComfyServer, graph: graphs.Graph) -> dict:
    """Run a graph that must fail at execution; return its execution_error event's data."""
    pid = server.queue(graph)
    entry = server.wait(pid, timeout=120, check=False)
    assert entry["status"]["status_str"] == "error", entry["status"]
    return server.wait_event(pid, "execution_error")["data"]


def assert_still_serving(server: ComfyServer) -> None:
    _, entry = server.run(paper(), timeout=120)
    assert entry["status"]["status_str"] == "success"


# ----------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("ckpt, scheduler", [(assets.DEMO, "simple"), (assets.EPS, "normal"), (assets.V, "normal")])
def test_stock_sampling_reproduces_lidits_own_sampler(ckpt, scheduler, comfy_server, lidit_assets) -> None:
    """ComfyUI's euler on this MODEL is lidit's Euler (flow) / DDIM (eps, v) on the same noise:
    the timestep normalisation, the sign conventions, the packed conditioning, the encode node
    and the refiners running per step all have to be right for the images to agree."""
    config = lidit_assets.config(ckpt)
    steps = config.steps if config.prediction == "flow" else 4  # 'normal' hits lidit's DDIM indices at 4
    graph = paper(steps=steps, scheduler=scheduler)
    graph[DIT]["inputs"].update(ckpt_name=ckpt, weight_dtype="fp32")  # as lidit's sampler below
    for loader in (SMOL_LOADER, GEMMA_LOADER):
        graph[loader]["inputs"]["dtype"] = "fp32"
    _, entry = comfy_server.run(graph, timeout=300)
    [png] = comfy_server.output_images(entry, node_id=SAVE)

    torch.set_num_threads(1)
    prompt = graph[POS_SMOL]["inputs"]
    template = PromptTemplate.of(config.text)
    cond, uncond = [], []
    for branch in config.text.branches:
        llm = load_llm(lidit_assets.llm_dirs[branch.name], layer=branch.layer)
        cond.append(encode(llm, [prompt["text"]], template, prompt["max_tokens"], branch.layer))
        uncond.append(encode(llm, [""], template, prompt["max_tokens"], branch.layer))
    model = load_checkpoint(lidit_assets.checkpoints[ckpt])
    size = config.resolution
    x = sample(model, config, cond, uncond, (1, config.dit.in_channels, size, size), steps=steps,
               seed=graph[SAMPLER]["inputs"]["seed"])
    want = np.clip(255.0 * ((x[0].permute(1, 2, 0).numpy() + 1) / 2), 0, 255).astype(np.uint8).astype(np.int16)
    diff = np.abs(png_array(png) - want)
    assert diff.max() <= 2 and diff.mean() < 0.1, (diff.max(), diff.mean())


def test_sd3_latent_checkpoint_samples_16_channels_at_one_eighth(comfy_server, lidit_assets) -> None:
    graph = paper(steps=2)
    graph[DIT]["inputs"]["ckpt_name"] = assets.SD3
    for nid in (VAE, DECODE, SAVE):
        del graph[nid]
    graph["20"] = {"class_type": "SaveLatent", "inputs": {"samples": [SAMPLER, 0], "filename_prefix": "latents/lidit_sd3"}}
    _, entry = comfy_server.run(graph, timeout=120)
    [meta] = entry["outputs"]["20"]["latents"]
    latent = load_file(comfy_server.output_dir / meta["subfolder"] / meta["filename"])["latent_tensor"]
    size = lidit_assets.config(assets.SD3).resolution // 8
    assert latent.shape == (1, 16, size, size) and torch.isfinite(latent).all()


# ----------------------------------------------------------------------------- stock nodes
def test_ksampler_advanced_in_two_halves(comfy_server, lidit_assets) -> None:
    graph = paper()
    seed = graph[SAMPLER]["inputs"]["seed"]
    common = {"model": [DIT, 0], "noise_seed": seed, "steps": 6, "cfg": 2.0, "sampler_name": "euler",
              "scheduler": "simple", "positive": [FUSE_POS, 0], "negative": [FUSE_NEG, 0]}
    graph["30"] = {"class_type": "EmptyChromaRadianceLatentImage", "inputs": {"width": 48, "height": 32, "batch_size": 1}}
    graph[SAMPLER] = {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "add_noise": "enable", "latent_image": ["30", 0], "start_at_step": 0, "end_at_step": 3,
        "return_with_leftover_noise": "enable"}}
    graph["31"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "add_noise": "disable", "latent_image": [SAMPLER, 0], "start_at_step": 3, "end_at_step": 10000,
        "return_with_leftover_noise": "disable"}}
    graph[DECODE]["inputs"]["samples"] = ["31", 0]
    pid, entry = comfy_server.run(graph, timeout=120)
    [png] = comfy_server.output_images(entry, node_id=SAVE)
    assert image_size(png) == (48, 32)
    progress = graphs.progress_by_node(comfy_server.events(pid))
    assert len(progress[SAMPLER]) == 3 and len(progress["31"]) == 3, progress


def test_img2img_with_denoise_below_one(comfy_server, lidit_assets) -> None:
    graph = paper()
    graph["30"] = {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 56, "batch_size": 1, "color": 0xCC2222}}
    graph["31"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["30", 0], "vae": [VAE, 0]}}
    graph[SAMPLER] = {"class_type": "KSampler", "inputs": {
        "model": [DIT, 0], "seed": graph[SAMPLER]["inputs"]["seed"], "steps": 5, "cfg": 2.0, "sampler_name": "euler",
        "scheduler": "simple", "positive": [FUSE_POS, 0], "negative": [FUSE_NEG, 0], "latent_image": ["31", 0],
        "denoise": 0.4}}
    pid, entry = comfy_server.run(graph, timeout=120)
    [png] = comfy_server.output_images(entry, node_id=SAVE)
    assert image_size(png) == (40, 56)
    assert len(graphs.progress_by_node(comfy_server.events(pid))[SAMPLER]) == 5


def test_sampler_resolution_presets_and_explicit_sizes(comfy_server, lidit_assets) -> None:
    config = lidit_assets.config(assets.DEMO)
    assert (config.resolution, config.dit.patch) == (64, 8), "the expected sizes below assume the demo geometry"
    graph = paper(resolution="16:9", steps=1)
    saves = {SAVE: (88, 48)}  # 16:9 at 64x64 pixels, in whole 8-pixel patches
    for nid, inputs, size in (("40", {"width": 32, "height": 0}, (32, 16)),
                              ("41", {"width": 48, "height": 40}, (48, 40))):
        graph[nid] = {"class_type": "LIDiTSampler", "inputs": {**graph[SAMPLER]["inputs"], **inputs}}
        saves[add_output(graph, nid, [nid, 0], f"lidit_size_{nid}")] = size
    _, entry = comfy_server.run(graph, timeout=120)
    for save, size in saves.items():
        [png] = comfy_server.output_images(entry, node_id=save)
        assert image_size(png) == size, save


# ----------------------------------------------------------------------------- host behaviour
def test_requeue_with_a_new_seed_reuses_loaders_and_encoders(comfy_server, lidit_assets) -> None:
    comfy_server.run(paper(), timeout=120)
    pid, _ = comfy_server.run(paper(), timeout=120)
    cached = set(comfy_server.wait_event(pid, "execution_cached")["data"]["nodes"])
    assert {SMOL_LOADER, GEMMA_LOADER, "3", "4", "5", "6", "7", "8", "9", "10", DIT, FUSE_POS, FUSE_NEG} <= cached
    executed = {e["data"]["node"] for e in comfy_server.events(pid) if e["type"] == "executing"}
    assert SAMPLER in executed and not executed & {SMOL_LOADER, GEMMA_LOADER, "3", "4", "5", "6"}


def test_interrupt_stops_sampling_and_the_next_prompt_runs(comfy_server, lidit_assets) -> None:
    steps = 3000
    pid = comfy_server.queue(paper(steps=steps))
    comfy_server.wait_event(pid, "progress", timeout=120)
    comfy_server.interrupt()
    entry = comfy_server.wait(pid, timeout=60, check=False)
    types = comfy_server.event_types(pid)
    assert "execution_interrupted" in types and "execution_success" not in types, types
    assert entry["status"]["status_str"] == "error"
    assert len(graphs.progress_by_node(comfy_server.events(pid)).get(SAMPLER, [])) < steps
    assert_still_serving(comfy_server)


def test_llm_is_cut_after_the_deepest_layer_the_graph_asks_and_reloaded_deeper_on_demand(comfy_server, lidit_assets) -> None:
    import re

    def loaded_layers(since: int) -> list[tuple[int, int]]:
        log = comfy_server.log_text(since=since)
        return [(int(k), int(n)) for k, n in re.findall(rf"loaded LLM {assets.SMOL} from .* \((\d+) of (\d+) layers", log)]

    graph = paper(steps=1)
    graph[SMOL_LOADER]["inputs"]["dtype"] = "fp32"  # inputs of its own: this loader runs afresh
    mark = comfy_server.log_size()
    comfy_server.run(graph, timeout=120)
    [(kept, total)] = loaded_layers(mark)
    assert kept == total - 2  # hidden_states[-3]: the last two layers are never loaded
    deeper = graphs.fresh(graph)
    for nid in ("3", "5"):  # the SmolLM2 encodes (prompt, negative) now ask for the last layer
        deeper[nid]["inputs"]["hidden_layer"] = -1
    mark = comfy_server.log_size()
    comfy_server.run(deeper, timeout=120)  # the loader comes from the cache, cut too short
    assert loaded_layers(mark) == [(total, total)]


def test_llm_list_holds_only_folders_with_a_config(comfy_server, comfy_models_dir, lidit_assets) -> None:
    (comfy_models_dir / "LLM" / "not-a-model").mkdir(exist_ok=True)
    options = comfy_server.object_info("LIDiTLLMLoader")["input"]["required"]["llm_name"][0]
    assert {assets.SMOL, assets.GEMMA} <= set(options) and "not-a-model" not in options


def test_names_resolve_to_the_first_registered_folder(comfy_server, lidit_assets) -> None:
    """The test server's model folders are registered before the pack's bundled ones, so the
    tiny models win over installed demo assets of the same name (and, in real mode, the demo's)."""
    graph = paper()
    graph[SMOL_LOADER]["inputs"]["device"] = "cpu"  # a new input: the loader runs again, and logs
    mark = comfy_server.log_size()
    comfy_server.run(graph, timeout=120)
    assert f"LI-DiT: loaded LLM {assets.SMOL} from {lidit_assets.llm_dirs[assets.SMOL]} (" in comfy_server.log_text(since=mark)


@pytest.mark.parametrize("weight_dtype", ["bf16", "fp16"])
def test_lower_precision_weights_sample(weight_dtype, comfy_server, lidit_assets) -> None:
    graph = paper(steps=2)
    graph[DIT]["inputs"]["weight_dtype"] = weight_dtype
    _, entry = comfy_server.run(graph, timeout=120)
    [png] = comfy_server.output_images(entry, node_id=SAVE)
    assert png_array(png).std() > 0


def test_fp16_llm_on_cpu_falls_back_with_a_warning(comfy_server, lidit_assets) -> None:
    graph = paper()
    graph[SMOL_LOADER]["inputs"]["dtype"] = "fp16"
    mark = comfy_server.log_size()
    comfy_server.run(graph, timeout=120)
    assert "float16 is not supported well on CPU; using float32" in comfy_server.log_text(since=mark)


def test_differences_from_training_are_warned(comfy_server, lidit_assets) -> None:
    graph = paper(steps=1)
    graph[POS_SMOL]["inputs"].update(hidden_layer=-2, instruction="none")
    graph[POS_GEMMA]["inputs"]["text"] = ", ".join(["a red circle and a blue square"] * 12)
    mark = comfy_server.log_size()
    comfy_server.run(graph, timeout=120)
    log = comfy_server.log_text(since=mark)
    assert f"refiner 0 was trained on hidden layer -3 of {assets.SMOL}, gets layer -2" in log
    assert f"the {assets.SMOL} text was encoded with another instruction than the checkpoint was trained with" in log
    trained = lidit_assets.config(assets.DEMO).text.max_tokens
    assert f"the {assets.GEMMA} prompt has " in log and f"tokens, the checkpoint was trained on at most {trained}" in log


def test_explicit_refiner_index_routes_swapped_branches(comfy_server, lidit_assets) -> None:
    graph = paper()
    graph[FUSE_POS]["inputs"].update(branch_1=[REF_POS_GEMMA, 0], branch_2=[REF_POS_SMOL, 0])
    graph[REF_POS_SMOL]["inputs"]["refiner_index"] = 0
    graph[REF_POS_GEMMA]["inputs"]["refiner_index"] = 1
    _, entry = comfy_server.run(graph, timeout=120)
    assert entry["status"]["status_str"] == "success"


# ----------------------------------------------------------------------------- bad graphs
def expected_branches(lidit_assets) -> str:
    return ", ".join(f"{b.name} (hidden {b.hidden_size})" for b in lidit_assets.config(assets.DEMO).text.branches)


def test_missing_branch_names_what_the_checkpoint_expects(comfy_server, lidit_assets) -> None:
    graph = paper()
    del graph[FUSE_POS]["inputs"]["branch_2"]
    error = failure(comfy_server, graph)
    assert error["node_id"] == FUSE_POS and error["node_type"] == "LIDiTCollaborativeFusion"
    assert f"this checkpoint expects 2 LLM branches: {expected_branches(lidit_assets)}; got 1" in error["exception_message"]
    assert_still_serving(comfy_server)


def test_swapped_branches_name_the_hidden_size_mismatch(comfy_server, lidit_assets) -> None:
    graph = paper()
    graph[FUSE_POS]["inputs"].update(branch_1=[REF_POS_GEMMA, 0], branch_2=[REF_POS_SMOL, 0])
    message = failure(comfy_server, graph)["exception_message"]
    smol, gemma = lidit_assets.config(assets.DEMO).text.branches
    assert (f"refiner 0 was trained on {smol.name} (hidden {smol.hidden_size}) but gets "
            f"{gemma.name} (hidden {gemma.hidden_size}) from branch_1") in message
    assert expected_branches(lidit_assets) in message


@pytest.mark.parametrize("name, says", [("no-such-llm", "no LLM folder named 'no-such-llm'"),
                                        ("../diffusion_models", "not a path")])
def test_unknown_or_path_like_llm_name_is_rejected_before_running(name, says, comfy_server, lidit_assets) -> None:
    graph = paper()
    graph[SMOL_LOADER]["inputs"]["llm_name"] = name
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.queue(graph)
    details = " ".join(e["details"] for e in rejected.value.node_errors[SMOL_LOADER]["errors"])
    assert says in details and "llm_name" in details
    assert_still_serving(comfy_server)


def test_a_foreign_or_mismatched_checkpoint_gets_a_clear_error(comfy_server, comfy_models_dir, lidit_assets) -> None:
    folder = comfy_models_dir / "diffusion_models"
    save_file({"weight": torch.zeros(2)}, str(folder / "not-lidit.safetensors"))
    state = load_file(lidit_assets.checkpoints[assets.DEMO])
    state["dit.final.linear.bias"] = torch.zeros(5)
    metadata = {"format": "lidit-v1", "lidit_config": read_config(lidit_assets.checkpoints[assets.DEMO]).to_json()}
    save_file(state, str(folder / "lidit-broken.safetensors"), metadata=metadata)
    for ckpt, says in (("not-lidit.safetensors", "not an LI-DiT checkpoint"),
                       ("lidit-broken.safetensors", "weight 'dit.final.linear.bias' has shape (5,), the model expects")):
        graph = paper()
        graph[DIT]["inputs"]["ckpt_name"] = ckpt
        error = failure(comfy_server, graph)
        assert error["node_id"] == DIT and says in error["exception_message"], error["exception_message"]
    assert_still_serving(comfy_server)


def test_stock_conditioning_into_lidit_is_refused_clearly(comfy_server, lidit_assets) -> None:
    graph = paper()
    graph["30"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": [FUSE_NEG, 0]}}
    graph["31"] = {"class_type": "ConditioningConcat", "inputs": {"conditioning_to": [FUSE_POS, 0],
                                                                   "conditioning_from": [FUSE_NEG, 0]}}
    graph[SAMPLER]["inputs"].update(negative=["30", 0], positive=["31", 0])
    error = failure(comfy_server, graph)
    assert error["node_id"] == SAMPLER and "ConditioningConcat" in error["exception_message"]
