"""PixArt converted into LI-DiT computes what ComfyUI's PixArt computes.

ComfyUI's own `PixArtMS` is built small, in float64, with every weight random (the per-block and
final `scale_shift_table`s included), and converted by `lidit.pixart`. Both networks then run with
ComfyUI's attention on the same noise, timesteps and caption tokens `y_embedder(y)`; they must agree
to 1e-10. Each switch flipped back to the paper's choice, and each mapping rule left out, must break
the equality, so no part of the mapping is dead weight.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import inproc
import pytest
import torch
from harness import REPO_ROOT

from lidit.pixart import RULES

HIDDEN, HEADS, DEPTH, CAPTION, TOKENS = 48, 4, 2, 24, 7  # width / 3: alpha's size embedders
#: (latent height, width, pe_interpolation fixed by a pos_embed, or None: from the size)
SIZES = [(64, 64, None), (48, 80, None), (32, 48, 2.0)]
TIMESTEPS = (999.0, 500.0)
BRANCHES = ["tiny-llama:64", "tiny-qwen2:48"]


def pixart_ms(pe_interpolation: float | None = None, micro: bool = False, seed: int = 0):
    """ComfyUI's PixArtMS with random float64 weights, and its state dict (a pos_embed buffer when
    pe_interpolation is fixed, as alpha's 256/512 checkpoints have)."""
    import comfy.ops
    from comfy.ldm.pixart.pixartms import PixArtMS

    net = PixArtMS(input_size=32, patch_size=2, in_channels=4, hidden_size=HIDDEN, depth=DEPTH, num_heads=HEADS,
                   caption_channels=CAPTION, model_max_length=TOKENS, pe_interpolation=pe_interpolation,
                   micro_condition=micro, dtype=torch.float64, operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*net.parameters(), *net.buffers()]:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / p.shape[-1] ** 0.5)
    sd = dict(net.state_dict())
    if pe_interpolation is not None:
        side = int(pe_interpolation) * 64 // 2  # the patch grid of the size ComfyUI's guess gives back
        sd["pos_embed"] = torch.zeros(1, side * side, HIDDEN, dtype=torch.float64)
    return net.eval(), sd


def converted(sd: dict, **kw):
    pixart = inproc.sub("lidit.pixart")
    return pixart.convert(sd, pixart.branches_of(BRANCHES), heads=HEADS, **kw).eval()


def inputs(h: int, w: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, h, w, generator=g, dtype=torch.float64),
            torch.randn(2, TOKENS, CAPTION, generator=g, dtype=torch.float64))


def both(net, sd: dict, model, h: int, w: int, timestep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PixArt on caption features y, and the LI-DiT backbone on its caption tokens y_proj(y), both with
    ComfyUI's attention."""
    x, y = inputs(h, w)
    context = inproc.sub("lidit.refiner").TextContext(inproc.sub("lidit.pixart").caption_projection(sd, y),
                                                      torch.ones(y.shape[:2], dtype=torch.bool), [TOKENS] * 2)
    attend = inproc.sub("nodes.attention").host_attend({}, DEPTH)
    with torch.no_grad():
        ref = net(x, torch.full((2,), timestep, dtype=torch.float64), y)
        return ref, model.dit(x, torch.full((2,), timestep / 1000, dtype=torch.float64), context, attend)


@pytest.mark.parametrize("h, w, pe", SIZES)
def test_converted_pixart_computes_what_comfyuis_pixart_computes(pack, h, w, pe):
    net, sd = pixart_ms(pe)
    model = converted(sd)
    assert model.config.dit.pe_interpolation == pe
    for timestep in TIMESTEPS:
        ref, out = both(net, sd, model, h, w, timestep)
        assert ref.shape == out.shape == (2, 4, h, w)
        assert (ref - out).abs().max() < 1e-10, (h, w, timestep)


@pytest.mark.parametrize("field, value", [("qk_norm", True), ("cross_query_norm", True), ("pos_rule", "grid"),
                                          ("adaln", "per_block"), ("final_modulation", "adaln"), ("pooled", True)])
def test_each_switch_flipped_back_breaks_the_equality(pack, field, value):
    """The flipped model gets every converted weight that still fits; the rest is a seeded init."""
    net, sd = pixart_ms()
    exact = converted(sd)
    config = dataclasses.replace(exact.config, dit=dataclasses.replace(exact.config.dit, **{field: value}))
    torch.manual_seed(0)
    flipped = inproc.sub("lidit.model").LIDiTModel(config, dtype=torch.float64).init_weights().eval()
    fits = {k: v for k, v in exact.state_dict().items() if k in flipped.state_dict()
            and flipped.state_dict()[k].shape == v.shape}
    flipped.load_state_dict(fits, strict=False)
    if field == "adaln":  # the per-block form of adaLN-single: t_block's weight in every block, no tables
        for block in flipped.dit.blocks:
            block.adaln.load_state_dict(exact.dit.t_block.state_dict())
    ref, out = both(net, sd, flipped, 48, 48, 999.0)
    assert (ref - out).abs().max() > 1e-3


def test_adaln_single_folds_exactly_into_per_block_adaln(pack):
    """The mapping the adaLN-single switch saves: each block's Linear = t_block, its bias + the table."""
    net, sd = pixart_ms()
    exact = converted(sd)
    config = dataclasses.replace(exact.config, dit=dataclasses.replace(exact.config.dit, adaln="per_block"))
    per_block = inproc.sub("lidit.model").LIDiTModel(config, dtype=torch.float64).eval()
    per_block.load_state_dict({k: v for k, v in exact.state_dict().items() if k in per_block.state_dict()}, strict=False)
    for block, source in zip(per_block.dit.blocks, exact.dit.blocks):
        block.adaln.weight.data.copy_(exact.dit.t_block.weight)
        block.adaln.bias.data.copy_(exact.dit.t_block.bias + source.scale_shift_table.reshape(-1))
    ref, out = both(net, sd, per_block, 48, 48, 500.0)
    assert (ref - out).abs().max() < 1e-10


@pytest.mark.parametrize("rule", [name for name, _ in RULES if name != "null context"])
def test_each_mapping_rule_is_needed(pack, rule, monkeypatch):
    pixart = inproc.sub("lidit.pixart")
    monkeypatch.setattr(pixart, "RULES", [(name, r) for name, r in pixart.RULES if name != rule])
    net, sd = pixart_ms()
    ref, out = both(net, sd, converted(sd), 48, 48, 999.0)
    assert (ref - out).abs().max() > 1e-3


def test_the_null_context_is_pixarts_learned_empty_caption(pack, monkeypatch):
    """An empty prompt through the whole LI-DiT model gives what PixArt gives for its y_embedding,
    which is what keeps CFG working; without the null-context rule it does not."""
    states = inproc.sub("lidit.states")
    net, sd = pixart_ms()
    x, _ = inputs(48, 48)
    empty = [states.TextStates(torch.zeros(2, 3, b.hidden_size, dtype=torch.float64), torch.ones(2, 3, dtype=torch.bool),
                               torch.zeros(2, 3, dtype=torch.bool)) for b in inproc.sub("lidit.pixart").branches_of(BRANCHES)]
    attend = inproc.sub("nodes.attention").host_attend({}, DEPTH)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    with torch.no_grad():
        ref = net(x, t * 1000, sd["y_embedder.y_embedding"].double()[None].expand(2, -1, -1))  # a float32 buffer
        assert (converted(sd)(x, t, empty, attend) - ref).abs().max() < 1e-10
        pixart = inproc.sub("lidit.pixart")
        monkeypatch.setattr(pixart, "RULES", [(name, r) for name, r in pixart.RULES if name != "null context"])
        assert (converted(sd)(x, t, empty, attend) - ref).abs().max() > 1e-3


def test_alpha_micro_conditions_fold_exactly_at_the_training_size(pack):
    net, sd = pixart_ms(micro=True)
    model = converted(sd, resolution=48 * 8)  # ComfyUI gives c_size = latent size x 8, c_ar = h / w
    assert model.config.latent_format == "sd15"
    ref, out = both(net, sd, model, 48, 48, 500.0)
    assert (ref - out).abs().max() < 1e-10
    ref, out = both(net, sd, model, 48, 64, 500.0)  # another size: an approximation, not exact
    assert (ref - out).abs().max() > 1e-6


def test_diffusers_keys_convert_to_the_same_model(pack):
    """ComfyUI's own diffusers key map, run backwards, gives a diffusers file of the same weights."""
    import comfy.utils

    _, sd = pixart_ms()
    diffusers = {}
    for key, target in comfy.utils.pixart_to_diffusers({"depth": DEPTH, "hidden_size": HIDDEN}).items():
        name, cut = (target, None) if isinstance(target, str) else target
        if name in sd:
            diffusers[f"transformer.{key}"] = sd[name] if cut is None else sd[name].narrow(*cut)
    pixart = inproc.sub("lidit.pixart")
    back = pixart.pixart_keys(diffusers)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_kv_compressed_and_pickled_files_are_refused(pack, tmp_path):
    pixart = inproc.sub("lidit.pixart")
    _, sd = pixart_ms()
    with pytest.raises(pixart.PixArtError, match="KV-compressed"):
        pixart.pixart_keys({**sd, "blocks.0.attn.sr.weight": torch.zeros(1)})
    torch.save({"state_dict": sd, "optimizer": object.__new__(dataclasses.Field)}, tmp_path / "x.pth")
    with pytest.raises(pixart.PixArtError, match="never loaded"):
        pixart.read_pixart(tmp_path / "x.pth")
    torch.save({"state_dict": sd}, tmp_path / "plain.pth")
    assert torch.equal(pixart.read_pixart(tmp_path / "plain.pth")["t_block.1.weight"], sd["t_block.1.weight"])


def test_sampling_sigmas_equal_comfyuis_pixart_sigma(pack):
    import comfy.model_base
    import comfy.supported_models

    _, sd = pixart_ms()
    config = converted(sd).config
    ours = inproc.sub("nodes.host_model").LIDiTSupportedModel(config)
    theirs = comfy.supported_models.PixArtSigma({"image_model": "pixart_sigma"})
    sigmas = [comfy.model_base.model_sampling(c, comfy.model_base.ModelType.EPS).sigmas for c in (ours, theirs)]
    assert torch.equal(*sigmas)
    assert type(ours.latent_format) is type(theirs.latent_format)


def test_the_converter_command_writes_a_checkpoint_that_loads(pack, tmp_path):
    from safetensors.torch import save_file

    _, sd = pixart_ms()
    src = tmp_path / "pixart.safetensors"
    save_file({f"model.diffusion_model.{k}": v.float() for k, v in sd.items()}, src)  # as ComfyUI saves one
    out = tmp_path / "lidit.safetensors"
    run = subprocess.run([sys.executable, "-m", "lidit", "convert", "pixart", str(src), "--out", str(out),
                          "--heads", str(HEADS), *(a for b in BRANCHES for a in ("--llm", b))],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    model = inproc.sub("lidit.checkpoint").load_checkpoint(out)
    assert model.config.dit.adaln == "single" and model.config.schedule == "linear"
    assert torch.equal(model.dit.t_block.weight, sd["t_block.1.weight"].float())


def test_a_pathway_joins_only_the_backbone_it_was_made_for(pack, tmp_path):
    pixart = inproc.sub("lidit.pixart")
    _, sd = pixart_ms()
    pixart.save_pathway(tmp_path / "pathway.safetensors", converted(sd))
    config, tensors = pixart.join_pathway(sd, tmp_path / "pathway.safetensors")
    assert all(torch.equal(tensors[k], v) for k, v in converted(sd).state_dict().items())  # backbone + pathway
    deeper = {**sd, **{k.replace("blocks.1.", "blocks.2."): v for k, v in sd.items() if k.startswith("blocks.1.")}}
    with pytest.raises(pixart.PixArtError, match="another backbone"):
        pixart.join_pathway(deeper, tmp_path / "pathway.safetensors")
    inproc.sub("lidit.checkpoint").save_checkpoint(tmp_path / "whole.safetensors", converted(sd))
    with pytest.raises(pixart.PixArtError, match="not an LI-DiT pathway file"):
        pixart.read_pathway(tmp_path / "whole.safetensors")


def test_the_node_refuses_a_model_that_is_not_pixart(pack):
    from types import SimpleNamespace

    node = inproc.sub("nodes.pixart").LIDiTFromPixArt()
    model = SimpleNamespace(model=SimpleNamespace(diffusion_model=torch.nn.Linear(1, 1)))
    with pytest.raises(ValueError, match="needs a PixArt-alpha or -Sigma MODEL; this one is a Linear"):
        node.convert(model, "any.safetensors")
