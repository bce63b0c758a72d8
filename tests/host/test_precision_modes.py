"""A GPU user's precision and memory paths, simulated on the CPU with ComfyUI's own machinery.

`build_lidit(path, weight dtype, manual-cast dtype)` builds the MODEL from the ops ComfyUI's
`pick_operations` gives for that pair, exactly as the loader does once ComfyUI has picked the
dtypes for a device: (fp16, None) is what a GPU without bf16 (T4, RTX 20xx) gets, (fp8, bf16) what
`--fp8_e4m3fn-unet` or an fp8 checkpoint gets on a recent GPU. Sampling is `comfy.sample.sample`,
KSampler's path, at the checkpoint's cfg (> 1), so the host's cond casting applies.
"""
from __future__ import annotations

import inproc
import numpy as np
import pytest
import torch

from lidit.study import scenes

PROMPT = "a red circle and a blue square"
CPU = torch.device("cpu")


def pixels(latent: torch.Tensor) -> np.ndarray:
    return ((latent[0].float().permute(1, 2, 0).numpy() + 1) / 2 * 255).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def demo(pack, demo_assets):
    """The demo in fp32 with its prompts encoded by the real LLMs (fp32), and its fp32 image."""
    build = inproc.sub("nodes.host_model").build_lidit
    model = build(str(demo_assets["checkpoint"]), torch.float32, None, CPU)
    llms = inproc.load_llms(demo_assets["llms"], "fp32")
    pos, neg = (inproc.conditioning(model, llms, text) for text in (PROMPT, ""))
    return {"build": lambda dtype, cast: build(str(demo_assets["checkpoint"]), dtype, cast, CPU),
            "pos": pos, "neg": neg, "fp32": inproc.ksample(model, pos, neg, seed=0)}


def weight_dtypes(patcher) -> set[torch.dtype]:
    return {p.dtype for p in patcher.model.diffusion_model.parameters()}


def test_fp16_weights_and_compute_stay_finite_and_within_tolerance_of_fp32(demo) -> None:
    """Gemma-3's states exceed float16 (its BOS ~1e5): cast raw by the host they would be inf, and
    the image NaN. They are standardised in float32 before the host casts anything."""
    assert demo["pos"][0][0].abs().max() > torch.finfo(torch.float16).max  # the hazard is real here
    model = demo["build"](torch.float16, None)
    assert weight_dtypes(model) == {torch.float16}
    out = inproc.ksample(model, demo["pos"], demo["neg"], seed=0)
    assert torch.isfinite(out).all()
    err = (out.float() - demo["fp32"]).abs()
    # stated tolerance: fp16 rounding over 25 Euler steps, in [-1, 1] pixel units
    assert err.mean() < 0.01 and err.max() < 0.15, (err.mean(), err.max())
    assert scenes.read_scene(pixels(out), 2) == [("red", "circle"), ("blue", "square")]


@pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_storage_draws_the_same_objects_as_fp32(demo, storage) -> None:
    model = demo["build"](storage, torch.bfloat16)
    assert weight_dtypes(model) == {storage}  # stored in 8 bits, cast per layer by comfy.ops
    out = inproc.ksample(model, demo["pos"], demo["neg"], seed=0)
    assert torch.isfinite(out).all()
    want = scenes.read_scene(pixels(demo["fp32"]), 2)
    assert want == [("red", "circle"), ("blue", "square")]
    assert scenes.read_scene(pixels(out), 2) == want


@pytest.mark.parametrize("native, option, want", [
    (True, "default", (torch.bfloat16, None)), (True, "fp16", (torch.float16, torch.bfloat16)),
    (True, "fp8_e4m3fn", (torch.float8_e4m3fn, torch.bfloat16)), (True, "fp32", (torch.float32, None)),
    (False, "default", (torch.float32, None)), (False, "bf16", (torch.bfloat16, torch.float32)),
])
def test_cpu_dtypes_use_native_bf16_and_never_compute_in_fp16(pack, monkeypatch, native, option, want) -> None:
    model = inproc.sub("nodes.host_model")
    monkeypatch.setattr(model, "cpu_has_native_bf16", lambda: native)
    assert model.inference_dtypes(option, torch.float32, 10**6, CPU) == want


def test_llm_auto_dtype_never_picks_fp16(pack, monkeypatch) -> None:
    import comfy.model_management as mm

    llm = inproc.sub("nodes.llm_loader")
    monkeypatch.setattr(mm, "should_use_bf16", lambda *a, **k: False)  # a GPU without bf16 (T4)
    monkeypatch.setattr(mm, "should_use_fp16", lambda *a, **k: True)
    assert llm.auto_dtype(torch.device("cuda")) == torch.float32
    monkeypatch.setattr(mm, "should_use_bf16", lambda *a, **k: True)
    assert llm.auto_dtype(torch.device("cuda")) == torch.bfloat16
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(llm, "cpu_has_native_bf16", lambda: native)
        assert llm.auto_dtype(CPU) == want


def test_partial_loading_streams_every_weight_and_gives_the_same_output(pack, tiny_pack_assets) -> None:
    """--lowvram / --novram / a model bigger than free VRAM: ModelPatcher casts per call only the
    weights of modules it lists and that have comfy_cast_weights; anything else would stay on the
    offload device and fail with a device mismatch on a GPU."""
    from comfy.model_patcher import ModelPatcher

    build = inproc.sub("nodes.host_model").build_lidit
    llms = inproc.load_llms(tiny_pack_assets["llms"])
    full = build(str(tiny_pack_assets["checkpoint"]), torch.float32, None, CPU)
    partial = build(str(tiny_pack_assets["checkpoint"]), torch.float32, None, CPU)
    partial.load(CPU, lowvram_model_memory=1, full_load=False)  # nothing fits: every module streams
    net = partial.model.diffusion_model
    owners = {f"diffusion_model.{name}": m for name, m in net.named_modules()}
    listed = {n for *_, n, _m, _p in ModelPatcher._load_list(partial)}
    for name, _ in net.named_parameters():
        owner = name.rpartition(".")[0]
        assert f"diffusion_model.{owner}" in listed, f"{name}: its module is not in the partial loader's list"
        assert getattr(owners[f"diffusion_model.{owner}"], "comfy_cast_weights", False), f"{name} is not cast per call"
    feature_norm = inproc.sub("lidit.refiner").FeatureNorm
    for name, _ in net.named_buffers():
        assert isinstance(owners[f"diffusion_model.{name.rpartition('.')[0]}"], feature_norm), \
            f"buffer {name} is never moved by the host, and its module does not move it at use"
    cond = inproc.conditioning(full, llms, PROMPT)
    x, sigma = torch.randn(1, 3, 64, 64), torch.tensor([0.7])
    text = {"cross_attn": cond[0][0], "device": CPU, "noise": x, **cond[0][1]}  # as comfy.samplers passes them
    outs = []
    for patcher in (full, partial):
        conds = patcher.model.extra_conds(**text)
        outs.append(patcher.model.apply_model(x, sigma, **{k: c.process_cond(1).cond for k, c in conds.items()}))
    torch.testing.assert_close(outs[1], outs[0])
