"""What ComfyUI users add to an LI-DiT graph, in-process through KSampler's path: DIFFUSION_MODEL and
APPLY_MODEL wrappers, EasyCache and LazyCache, SkipLayerGuidanceDiT's block patches, and
TorchCompileModel (docs/comfyui-extensions.md)."""
from __future__ import annotations

import logging

import inproc
import numpy as np
import pytest
import torch

from lidit.study import scenes


@pytest.fixture(scope="module")
def tiny(pack, tiny_pack_assets):
    build = inproc.sub("nodes.host_model").build_lidit
    model = build(str(tiny_pack_assets["checkpoint"]), torch.float32, None, torch.device("cpu"))
    llms = inproc.load_llms(tiny_pack_assets["llms"])
    pos, neg = (inproc.conditioning(model, llms, text) for text in ("a red circle and a blue square", ""))
    return {"model": model, "llms": llms, "pos": pos, "neg": neg}


def test_diffusion_model_and_apply_model_wrappers_run_around_every_forward(tiny) -> None:
    """A wrapper sees the forward's arguments (transformer_options with ComfyUI's sigmas and uuids)
    and what it returns is what the sampler gets: a wrapper that zeroes the output changes the image."""
    import comfy.patcher_extension as ext

    seen = {ext.WrappersMP.DIFFUSION_MODEL: [], ext.WrappersMP.APPLY_MODEL: []}

    def wrapper(kind, zero):
        def wrap(executor, *args, **kwargs):
            options = kwargs.get("transformer_options", args[-1] if args and isinstance(args[-1], dict) else {})
            seen[kind].append(("sigmas" in options, "uuids" in options, args[0].shape[0]))
            out = executor(*args, **kwargs)
            return out * 0 if zero else out
        return wrap

    base = inproc.ksample(tiny["model"], tiny["pos"], tiny["neg"], steps=3, cfg=3.0, seed=1)
    for kind in seen:
        model = tiny["model"].clone()
        model.add_wrapper_with_key(kind, "test", wrapper(kind, zero=False))
        same = inproc.ksample(model, tiny["pos"], tiny["neg"], steps=3, cfg=3.0, seed=1)
        torch.testing.assert_close(same, base, rtol=0, atol=0)
        assert seen[kind] == [(True, True, 2)] * 3, kind
    model = tiny["model"].clone()
    model.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, "test", wrapper(ext.WrappersMP.DIFFUSION_MODEL, True))
    zeroed = inproc.ksample(model, tiny["pos"], tiny["neg"], steps=3, cfg=3.0, seed=1)
    assert (zeroed - base).abs().max() > 1e-2


def test_skip_layer_guidance_dit_skips_lidit_blocks(tiny, caplog) -> None:
    """SkipLayerGuidanceDiT replaces ('double_block', i) with an identity in an extra forward: a
    block that exists changes the image; a block index past the depth leaves it as it was (the
    extra forward then equals the cond one, up to batch-1 against batch-2 rounding). single_layers have no LI-DiT counterpart and
    are reported."""
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT

    def slg(double: str, single: str = ""):
        return SkipLayerGuidanceDiT.execute(tiny["model"], scale=3.0, start_percent=0.0, end_percent=1.0,
                                            double_layers=double, single_layers=single).result[0]
    depth = inproc.sub("nodes.host_model").lidit_config_of(tiny["model"]).dit.depth
    base = inproc.ksample(tiny["model"], tiny["pos"], tiny["neg"], steps=3, cfg=3.0, seed=2)
    skipped = inproc.ksample(slg("0"), tiny["pos"], tiny["neg"], steps=3, cfg=3.0, seed=2)
    assert (skipped - base).abs().max() > 1e-2
    with caplog.at_level(logging.WARNING):
        beyond = inproc.ksample(slg(str(depth + 3), "1"), tiny["pos"], tiny["neg"], steps=3, cfg=3.0, seed=2)
    torch.testing.assert_close(beyond, base, rtol=0, atol=1e-5)
    assert "single_block" in caplog.text and "no single-stream blocks" in caplog.text


def image_of(latent: torch.Tensor) -> np.ndarray:
    return scenes.to_uint8(((latent[0].float() + 1) / 2).clamp(0, 1))


def test_easycache_and_lazycache_skip_steps_and_keep_the_objects(demo_assets, caplog) -> None:
    """On the real demo at its defaults (25 steps, cfg 2): the stock caches at their defaults skip
    steps (fewer forwards, and EasyCache's own log says so), and the checker reads the same
    objects as without a cache."""
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

    model = inproc.sub("nodes.host_model").load_lidit(str(demo_assets["checkpoint"]))
    llms = inproc.load_llms(demo_assets["llms"])
    pos, neg = (inproc.conditioning(model, llms, text) for text in ("a red circle and a blue square", ""))
    steps = inproc.sub("nodes.host_model").lidit_config_of(model).steps
    net = inproc.sub("nodes.host_model").LIDiTHostNet
    calls, inner = [], net._forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return inner(self, *args, **kwargs)
    net._forward = counted
    try:
        base = inproc.ksample(model, pos, neg, seed=0)
        assert len(calls) == steps
        assert scenes.read_scene(image_of(base), 2) == [("red", "circle"), ("blue", "square")]
        for node, name in ((EasyCacheNode, "EasyCache"), (LazyCacheNode, "LazyCache")):
            cached = node.execute(model, reuse_threshold=0.2, start_percent=0.15, end_percent=0.95,
                                  verbose=False).result[0]
            calls.clear()
            with caplog.at_level(logging.INFO):
                out = inproc.ksample(cached, pos, neg, seed=0)
            assert 0 < len(calls) < steps, name
            assert f"{name} - skipped {steps - len(calls)}/{steps} steps" in caplog.text
            assert scenes.read_scene(image_of(out), 2) == [("red", "circle"), ("blue", "square")], name
    finally:
        net._forward = inner


def test_torch_compile_draws_the_same_image_and_recompiles_only_for_new_dynamic_dims(tiny, monkeypatch) -> None:
    """TorchCompileModel's own function (set_torch_compile_wrapper, an APPLY_MODEL wrapper that swaps in
    the compiled diffusion_model) with dynamo's eager backend: which graphs are traced, and when
    they recompile, is dynamo's doing whatever the backend (inductor's compile would take minutes
    here; scripts/perf_compile.py runs inductor and compares its image). The image equals the eager
    one. A new size compiles once more (the dimension turns dynamic) and a third size not at all;
    so does a new batch size, and a third and fourth batch size not at all (the text's token
    counts reach the forward per kind of row, not per row). ComfyUI's attention is its GPU default,
    PyTorch's SDPA: its CPU default (sub-quadratic) reads the free memory in every call, which
    breaks the graph around every attention."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import comfy.ldm.modules.attention as comfy_attention
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    monkeypatch.setattr(comfy_attention, "optimized_attention", comfy_attention.attention_pytorch)
    monkeypatch.setattr(comfy_attention, "optimized_attention_masked", comfy_attention.attention_pytorch)
    torch._dynamo.reset()
    counters.clear()
    compiled = tiny["model"].clone()
    set_torch_compile_wrapper(compiled, backend="eager")
    graphs = []
    for size, batch in ((64, 1), (96, 1), (128, 1), (64, 2), (64, 3), (96, 4)):
        eager = inproc.ksample(tiny["model"], tiny["pos"], tiny["neg"], steps=1, cfg=3.0, seed=3, size=size, batch=batch)
        out = inproc.ksample(compiled, tiny["pos"], tiny["neg"], steps=1, cfg=3.0, seed=3, size=size, batch=batch)
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs[0] > 0 and graphs[2] == graphs[1] > graphs[0], graphs
    assert graphs[5] == graphs[4] == graphs[3] > graphs[2], graphs
    torch._dynamo.reset()
