"""What happens inside a KSampler run (comfy.sample.sample) on an LI-DiT MODEL, counted in-process:
one batched forward per step at cfg > 1, the text's timestep-free work once per run, ComfyUI's
attention with masks only where there is padding, attention patches, and ConditioningZeroOut."""
from __future__ import annotations

import logging

import inproc
import pytest
import torch

STEPS = 10


@pytest.fixture(scope="module")
def tiny(pack, tiny_pack_assets):
    build = inproc.sub("nodes.host_model").build_lidit
    model = build(str(tiny_pack_assets["checkpoint"]), torch.float32, None, torch.device("cpu"))
    llms = inproc.load_llms(tiny_pack_assets["llms"])
    long_, short = (inproc.conditioning(model, llms, text)
                    for text in ("a white circle, an orange square, a red triangle and a blue circle", "a red circle"))
    assert long_[0][0].shape[1] != short[0][0].shape[1]  # prompt and negative of different lengths
    return {"model": model, "llms": llms, "pos": long_, "neg": short}


def count_calls(monkeypatch, owner, name: str) -> list:
    """Record the first positional argument's batch size (or None) of every call to owner.name."""
    calls, original = [], getattr(owner, name)

    def counted(*args, **kwargs):
        first = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
        calls.append(None if first is None else first.shape[0])
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, counted)
    return calls


def test_cfg_runs_prompt_and_negative_in_one_forward_per_step(tiny, monkeypatch) -> None:
    net = inproc.sub("nodes.host_model").LIDiTHostNet
    calls = count_calls(monkeypatch, net, "forward")
    batched = inproc.ksample(tiny["model"], tiny["pos"], tiny["neg"], steps=STEPS, cfg=3.0)
    assert calls == [2] * STEPS
    # the same run with batching refused: two forwards a step, and the same image (padding is exact)
    monkeypatch.setattr(inproc.sub("nodes.conditioning").CONDText, "can_concat", lambda self, other: False)
    calls.clear()
    separate = inproc.ksample(tiny["model"], tiny["pos"], tiny["neg"], steps=STEPS, cfg=3.0)
    assert calls == [1] * (2 * STEPS)
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=1e-5)


def test_timestep_free_text_work_runs_once_per_prompt_per_run(tiny, monkeypatch) -> None:
    refiner = inproc.sub("lidit.refiner")
    prepares = count_calls(monkeypatch, refiner.TextPathway, "prepare")
    norms = count_calls(monkeypatch, refiner.FeatureNorm, "forward")
    inproc.ksample(tiny["model"], tiny["pos"], tiny["neg"], steps=STEPS, cfg=3.0, seed=1)
    assert len(prepares) == 2  # the prompt and the negative, not 2 per step
    assert len(norms) == 2 * len(tiny["llms"])


def test_attention_goes_through_comfyui_with_masks_only_where_there_is_padding(tiny, monkeypatch) -> None:
    import comfy.ldm.modules.attention as attention

    plain = count_calls(monkeypatch, attention, "optimized_attention")
    masked = count_calls(monkeypatch, attention, "optimized_attention_masked")
    inproc.ksample(tiny["model"], tiny["pos"], tiny["neg"], steps=2, cfg=1.0, seed=2)  # one prompt: no padding
    assert plain and not masked
    plain.clear()
    inproc.ksample(tiny["model"], tiny["pos"], tiny["neg"], steps=2, cfg=3.0, seed=2)  # the negative is padded
    assert plain and masked


def test_perturbed_attention_guidance_takes_effect(tiny) -> None:
    """PAG replaces attn1 of UNet block ('middle', 0), here the middle DiT block's self-attention,
    in an extra forward whose difference from the cond prediction it adds. Were the patch ignored,
    that difference would be zero and the image the unpatched one."""
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    patched = PerturbedAttentionGuidance.execute(tiny["model"], scale=3.0).result[0]
    base = inproc.ksample(tiny["model"], tiny["pos"], tiny["neg"], steps=4, cfg=3.0, seed=3)
    out = inproc.ksample(patched, tiny["pos"], tiny["neg"], steps=4, cfg=3.0, seed=3)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3


def test_attention_patches_for_blocks_lidit_lacks_are_reported(tiny, caplog) -> None:
    model = tiny["model"].clone()
    model.set_model_attn2_replace(lambda q, k, v, extra_options: v, "input", 4)
    with caplog.at_level(logging.WARNING):
        inproc.ksample(model, tiny["pos"], tiny["neg"], steps=2, cfg=3.0, seed=4)
    assert "ignoring attention patches for UNet blocks it does not have: attn2 ('input', 4)" in caplog.text


def test_conditioning_zero_out_means_no_text(tiny) -> None:
    """ComfyUI's ConditioningZeroOut on an LI-DiT conditioning: every token is zero, so every token
    is masked out and the model sees no text at all, as zeros mean for core models."""
    import nodes

    (zeroed,) = nodes.ConditioningZeroOut().zero_out(tiny["neg"])
    conds = tiny["model"].model.extra_conds(cross_attn=zeroed[0][0], device=torch.device("cpu"),
                                            noise=torch.zeros(1, 3, 64, 64), **zeroed[0][1])
    branches = conds["lidit_text"].cond
    assert all(b.real == [0] and b.prompt_lengths == [0] for b in branches)
    # the same as no tokens at all
    empty = [[torch.zeros(1, 0, zeroed[0][0].shape[2]),
              {**zeroed[0][1], "lidit_mask": torch.zeros(1, 0, dtype=torch.bool),
               "lidit_prompt": torch.zeros(1, 0, dtype=torch.bool),
               "lidit_layout": tuple((hidden, 0) for hidden, _ in zeroed[0][1]["lidit_layout"])}]]
    a = inproc.ksample(tiny["model"], tiny["pos"], zeroed, steps=3, cfg=3.0, seed=5)
    b = inproc.ksample(tiny["model"], tiny["pos"], empty, steps=3, cfg=3.0, seed=5)
    c = inproc.ksample(tiny["model"], tiny["pos"], tiny["neg"], steps=3, cfg=3.0, seed=5)
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3  # and not the zeroed prompt's own text


@pytest.mark.parametrize("path, root, name, ok", [
    ("posixpath", "/m/LLM", "llama", True), ("posixpath", "/m/LLM", "../x", False), ("posixpath", "/m/LLM", "a/b", False),
    ("posixpath", "/m/LLM", "/etc", False), ("posixpath", "/m/LLM", ".", False), ("posixpath", "/m/LLM", "", False),
    ("ntpath", "C:\\m\\LLM", "llama", True), ("ntpath", "C:\\m\\LLM", "C:foo", False), ("ntpath", "C:\\m\\LLM", "D:foo", False),
    ("ntpath", "C:\\m\\LLM", "..\\x", False), ("ntpath", "C:\\m\\LLM", "a\\b", False),
    ("ntpath", "C:\\m\\LLM", "\\\\host\\share", False),
])
def test_llm_names_resolve_strictly_inside_their_folder(pack, path, root, name, ok) -> None:
    import importlib

    got = inproc.sub("nodes.folders").child(root, name, importlib.import_module(path))
    assert (got is not None) == ok, got


def test_pack_checkpoints_are_listed_only_by_the_lidit_loader(pack) -> None:
    import folder_paths

    import nodes

    folders = inproc.sub("nodes.folders")
    bundled = sorted(p.name for p in folders.PACK_CHECKPOINT_DIR.glob("*.safetensors"))
    assert bundled
    stock = nodes.UNETLoader.INPUT_TYPES()["required"]["unet_name"][0]
    assert not set(bundled) & set(stock) and not set(bundled) & set(folder_paths.get_filename_list("diffusion_models"))
    ours = inproc.sub("nodes.model_loader").LIDiTLoader.INPUT_TYPES()["required"]["ckpt_name"][0]
    assert set(bundled) <= set(ours)
    assert folders.resolve_checkpoint(bundled[0]) == folders.PACK_CHECKPOINT_DIR / bundled[0]
