"""PixArt-alpha and PixArt-Sigma backbones as exact LI-DiT backbones, and the LLM pathway beside them.

PixArt's DiT is LI-DiT-1B's (depth 28, width 1152, 16 heads, patch 2; self-attention,
cross-attention, FFN and AdaLN in every block). With the `DiTConfig` switches set as
`pixart_config` sets them (no QK-norm, a raw cross-attention query, PixArt's position table,
adaLN-single, the final table, no pooled path) and the linear DDPM schedule, the converted
backbone computes what PixArt computes, given the same caption tokens `y_embedder(y)`. The T5
caption projection has no counterpart: the LLM pathway (token refiners, collaborative refiner)
takes its place, and is what gets trained. PixArt's learned empty caption becomes the pathway's
null context, so classifier-free guidance keeps the unconditional mode the backbone learned.

The weights are read as ComfyUI reads them: safetensors with PixArt's own key names or
diffusers' (`transformer_blocks.*`), or an original `.pth` only through
`torch.load(weights_only=True)`. Learned sigma is dropped (PixArt predicts 8 channels; the first 4
are eps), and PixArt-alpha-1024's size and aspect micro-conditions are folded into the timestep
embedding at one size (exact there, an approximation elsewhere).

The pathway file (`save_pathway`) holds what a user trains and shares: the `text.*` weights (the
refiners, the collaborative refiner, the null context) and every block's cross-attention K/V
projection, with the whole model's config in its metadata; `join_pathway` puts it beside a
converted backbone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .checkpoint import CheckpointError, config_of, read_header
from .config import DiTConfig, LIDiTConfig, LLMBranch, TextConfig
from .model import LIDiTModel

PATHWAY_FORMAT = "lidit-pathway-v1"
PIXART_HEADS = 16  # ComfyUI builds every PixArt with 16 heads (head size 72 at width 1152)
_KV = re.compile(r"dit\.blocks\.\d+\.cross_attn\.kv\.")

#: diffusers' names of PixArt's weights -> PixArt's own (ComfyUI's comfy.utils.pixart_to_diffusers)
DIFFUSERS_BASIC = {
    "adaln_single.emb.resolution_embedder.linear_1": "csize_embedder.mlp.0",
    "adaln_single.emb.resolution_embedder.linear_2": "csize_embedder.mlp.2",
    "adaln_single.emb.aspect_ratio_embedder.linear_1": "ar_embedder.mlp.0",
    "adaln_single.emb.aspect_ratio_embedder.linear_2": "ar_embedder.mlp.2",
    "pos_embed.proj": "x_embedder.proj",
    "caption_projection.y_embedding": "y_embedder.y_embedding",
    "caption_projection.linear_1": "y_embedder.y_proj.fc1",
    "caption_projection.linear_2": "y_embedder.y_proj.fc2",
    "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "adaln_single.linear": "t_block.1",
    "proj_out": "final_layer.linear",
    "scale_shift_table": "final_layer.scale_shift_table",
}
DIFFUSERS_BLOCK = {
    "scale_shift_table": "scale_shift_table", "attn1.to_out.0": "attn.proj", "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2", "attn2.to_out.0": "cross_attn.proj", "attn2.to_q": "cross_attn.q_linear",
}


class PixArtError(CheckpointError):
    pass


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------
def read_pixart(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A PixArt state dict under PixArt's own key names, from any of the files users hold."""
    name = os.path.basename(path)
    if str(path).endswith((".safetensors", ".sft")):
        read_header(path)  # a damaged file fails with a clear message before anything is read
        sd = load_file(path)
    elif str(path).endswith((".pth", ".pt", ".bin")):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors only: nothing runs
        except pickle.UnpicklingError as e:
            raise PixArtError(f"{name} holds more than tensors ({str(e).splitlines()[0]}), and pickled objects are "
                              "never loaded here: use a .safetensors copy of the checkpoint") from None
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    else:
        raise PixArtError(f"{name}: PixArt weights are read from .safetensors or (weights only) .pth files")
    return pixart_keys(sd, name)


def pixart_keys(sd: Mapping[str, torch.Tensor], name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """PixArt's own key names, from its own (optionally `model.diffusion_model.`-prefixed, as ComfyUI
    saves it) or from diffusers' (optionally `transformer.`-prefixed)."""
    for marker, convert in (("t_block.1.weight", lambda s: dict(s)), ("adaln_single.linear.weight", from_diffusers)):
        prefixes = {k[:-len(marker)] for k in sd if k.endswith(marker)}
        if len(prefixes) == 1:
            prefix = prefixes.pop()
            sd = convert({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
            break
    else:
        raise PixArtError(f"{name} is not a PixArt-alpha or PixArt-Sigma transformer: it has neither `t_block.1.weight` "
                          "(PixArt's names) nor `adaln_single.linear.weight` (diffusers' names)")
    if any(".attn.sr." in k for k in sd):
        raise PixArtError(f"{name} is a KV-compressed PixArt (attn.sr.* weights): its self-attention attends to "
                          "downsampled keys, which LI-DiT's backbone does not do. Use a PixArt-Sigma or -alpha "
                          "checkpoint without KV compression.")
    if any(".attn.q_norm." in k for k in sd):
        raise PixArtError(f"{name} has PixArt's QK LayerNorm (attn.q_norm.*), which has no LI-DiT counterpart")
    return sd


def from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = re.match(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$", key) or \
            re.match(r"transformer_blocks\.(\d+)\.(scale_shift_table)()$", key)
        if m:
            i, part, end = m.groups()
            if part in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_k", "attn2.to_v"):
                blocks.setdefault(f"{i}.{part[:5]}.{end}", {})[part[-1]] = value
            else:
                out[f"blocks.{i}.{DIFFUSERS_BLOCK[part]}" + (f".{end}" if end else "")] = value
            continue
        stem, _, end = key.rpartition(".")
        if key in DIFFUSERS_BASIC:
            out[DIFFUSERS_BASIC[key]] = value
        elif stem in DIFFUSERS_BASIC:
            out[f"{DIFFUSERS_BASIC[stem]}.{end}"] = value
    for key, parts in blocks.items():
        i, attn, end = key.split(".")
        if attn == "attn1":
            out[f"blocks.{i}.attn.qkv.{end}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:
            out[f"blocks.{i}.cross_attn.kv_linear.{end}"] = torch.cat([parts["k"], parts["v"]])
    return out


# --------------------------------------------------------------------------------------------------
# the config
# --------------------------------------------------------------------------------------------------
def depth_of(sd: Mapping[str, torch.Tensor]) -> int:
    return 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))


def pixart_config(sd: Mapping[str, torch.Tensor], branches: list[LLMBranch], heads: int = PIXART_HEADS,
                  resolution: int | None = None, prediction: str = "eps") -> LIDiTConfig:
    """The LI-DiT config whose backbone is this PixArt's, fed by `branches` (fresh refiners, one per LLM).

    PixArt-alpha (micro-conditions) decodes with SD-1.5's VAE, Sigma with SDXL's, as in ComfyUI; a
    3-channel one (a PixArt trained on pixels, as the CPU-scale proof's teacher) is a pixel model. A
    checkpoint with a `pos_embed` buffer (alpha at 256/512) fixes `pe_interpolation` and its size.
    PixArt predicts the noise; `prediction="v"` is for a PixArt-architecture model trained on v.
    """
    hidden, channels, patch, _ = sd["x_embedder.proj.weight"].shape
    alpha = "ar_embedder.mlp.0.weight" in sd
    pe_interpolation, size = None, resolution or 1024
    if "pos_embed" in sd:
        side = int(math.sqrt(sd["pos_embed"].shape[1])) * patch  # latent pixels, as ComfyUI's guess
        pe_interpolation, size = float(side // (512 // 8)), resolution or side * 8
    null_tokens = sd["y_embedder.y_embedding"].shape[0]
    return LIDiTConfig(
        text=TextConfig(branches=tuple(branches), width=hidden, heads=heads, max_tokens=null_tokens,
                        null_tokens=null_tokens),
        dit=DiTConfig(depth=depth_of(sd), hidden=hidden, heads=heads, patch=patch, in_channels=channels,
                      pos_table=True, pos_rule="pixart", pe_interpolation=pe_interpolation, qk_norm=False,
                      cross_query_norm=False, adaln="single", final_modulation="table", pooled=False),
        prediction=prediction, schedule="linear", resolution=size,
        latent_format="pixel" if channels == 3 else "sd15" if alpha else "sdxl",
        steps=20, cfg=4.5,
    )


# --------------------------------------------------------------------------------------------------
# the weights
# --------------------------------------------------------------------------------------------------
def _copy(src: str, dst: str) -> Callable:
    def rule(sd: Mapping[str, torch.Tensor], config: LIDiTConfig) -> dict[str, torch.Tensor]:
        return {f"{dst}.{end}": sd[f"{src}.{end}"] for end in ("weight", "bias")}
    return rule


def _per_block(rule: Callable[[int], Callable]) -> Callable:
    def each(sd: Mapping[str, torch.Tensor], config: LIDiTConfig) -> dict[str, torch.Tensor]:
        return {k: v for i in range(config.dit.depth) for k, v in rule(i)(sd, config).items()}
    return each


def _self_attention(i: int) -> Callable:
    """PixArt's fused qkv: rows [:C] are the query, [C:] the keys and values, as lidit's kv expects."""
    def rule(sd: Mapping[str, torch.Tensor], config: LIDiTConfig) -> dict[str, torch.Tensor]:
        c, src, dst = config.dit.hidden, f"blocks.{i}.attn.qkv", f"dit.blocks.{i}.self_attn"
        return {f"{dst}.{part}.{end}": rows for end in ("weight", "bias")
                for part, rows in (("q", sd[f"{src}.{end}"][:c]), ("kv", sd[f"{src}.{end}"][c:]))}
    return rule


def _block_table(i: int) -> Callable:
    def rule(sd: Mapping[str, torch.Tensor], config: LIDiTConfig) -> dict[str, torch.Tensor]:
        return {f"dit.blocks.{i}.scale_shift_table": sd[f"blocks.{i}.scale_shift_table"]}
    return rule


def _final_linear(sd: Mapping[str, torch.Tensor], config: LIDiTConfig) -> dict[str, torch.Tensor]:
    """Learned sigma dropped: of the (p q c) output rows with c in 0..2C-1, keep c < C (eps)."""
    channels = config.dit.in_channels
    out = {}
    for end in ("weight", "bias"):
        value = sd[f"final_layer.linear.{end}"]
        per_pixel = value.shape[0] // config.dit.patch ** 2
        keep = torch.arange(value.shape[0]) % per_pixel < channels
        out[f"dit.final.linear.{end}"] = value[keep]
    return out


def _final_table(sd: Mapping[str, torch.Tensor], config: LIDiTConfig) -> dict[str, torch.Tensor]:
    return {"dit.final.scale_shift_table": sd["final_layer.scale_shift_table"]}


def _timestep(sd: Mapping[str, torch.Tensor], config: LIDiTConfig) -> dict[str, torch.Tensor]:
    out = {**_copy("t_embedder.mlp.0", "dit.t_embedder.fc1")(sd, config),
           **_copy("t_embedder.mlp.2", "dit.t_embedder.fc2")(sd, config)}
    if "ar_embedder.mlp.0.weight" in sd:  # alpha-1024: t + (size, aspect) embeddings, constant at one size
        out["dit.t_embedder.fc2.bias"] = out["dit.t_embedder.fc2.bias"] + micro_conditions(sd, config.resolution)
    return out


def _identity_resblock(sd: Mapping[str, torch.Tensor], config: LIDiTConfig) -> dict[str, torch.Tensor]:
    """PixArt has no conv position ResBlock: a zero last conv makes it the identity, and a random first
    conv (Xavier, from a fixed seed, so every conversion makes the same one) lets it learn."""
    c, dtype = config.dit.hidden, sd["t_block.1.weight"].dtype
    bound = (6 / (2 * 9 * c)) ** 0.5
    conv1 = (torch.rand(c, c, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1) * bound
    return {"dit.pos_embed.conv1.weight": conv1.to(dtype), "dit.pos_embed.conv1.bias": torch.zeros(c, dtype=dtype),
            "dit.pos_embed.conv2.weight": torch.zeros(c, c, 3, 3, dtype=dtype),
            "dit.pos_embed.conv2.bias": torch.zeros(c, dtype=dtype)}


def _null_context(sd: Mapping[str, torch.Tensor], config: LIDiTConfig) -> dict[str, torch.Tensor]:
    """PixArt's learned empty caption through its caption projection: what its blocks saw for CFG."""
    return {"text.null": caption_projection(sd, sd["y_embedder.y_embedding"].double())}


#: (what, rule): each rule maps one part of PixArt's state dict onto LI-DiT's keys
RULES: list[tuple[str, Callable]] = [
    ("patch embed", _copy("x_embedder.proj", "dit.patch_embed")),
    ("position ResBlock as identity", _identity_resblock),
    ("timestep embedder", _timestep),
    ("shared adaLN", _copy("t_block.1", "dit.t_block")),
    ("block tables", _per_block(_block_table)),
    ("self-attention", _per_block(_self_attention)),
    ("self-attention out", _per_block(lambda i: _copy(f"blocks.{i}.attn.proj", f"dit.blocks.{i}.self_attn.out"))),
    ("cross-attention query", _per_block(lambda i: _copy(f"blocks.{i}.cross_attn.q_linear", f"dit.blocks.{i}.cross_attn.q"))),
    ("cross-attention K/V", _per_block(lambda i: _copy(f"blocks.{i}.cross_attn.kv_linear", f"dit.blocks.{i}.cross_attn.kv"))),
    ("cross-attention out", _per_block(lambda i: _copy(f"blocks.{i}.cross_attn.proj", f"dit.blocks.{i}.cross_attn.out"))),
    ("FFN in", _per_block(lambda i: _copy(f"blocks.{i}.mlp.fc1", f"dit.blocks.{i}.mlp.fc1"))),
    ("FFN out", _per_block(lambda i: _copy(f"blocks.{i}.mlp.fc2", f"dit.blocks.{i}.mlp.fc2"))),
    ("final table", _final_table),
    ("final linear", _final_linear),
    ("null context", _null_context),
]


def caption_projection(sd: Mapping[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """PixArt's y_embedder.y_proj (Linear, GELU tanh, Linear), in y's dtype."""
    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, sd[f"{name}.weight"].to(x), sd[f"{name}.bias"].to(x))
    return linear(F.gelu(linear(y, "y_embedder.y_proj.fc1"), approximate="tanh"), "y_embedder.y_proj.fc2")


def micro_conditions(sd: Mapping[str, torch.Tensor], resolution: int) -> torch.Tensor:
    """PixArt-alpha's size and aspect embeddings of a square `resolution` image, as ComfyUI gives them."""
    def embed(name: str, values: list[float]) -> torch.Tensor:
        s = torch.tensor(values, dtype=torch.float64)
        half = 128  # 256 frequencies, as ComfyUI's timestep_embedding
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = s[:, None].float() * freqs[None]
        x = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).double()
        x = F.linear(F.silu(F.linear(x, sd[f"{name}.mlp.0.weight"].double(), sd[f"{name}.mlp.0.bias"].double())),
                     sd[f"{name}.mlp.2.weight"].double(), sd[f"{name}.mlp.2.bias"].double())
        return x.reshape(-1)
    return torch.cat([embed("csize_embedder", [resolution, resolution]), embed("ar_embedder", [1.0])])


def convert_backbone(sd: Mapping[str, torch.Tensor], config: LIDiTConfig) -> dict[str, torch.Tensor]:
    """LI-DiT's `dit.*` weights and null context from PixArt's state dict (PixArt's key names)."""
    out: dict[str, torch.Tensor] = {}
    for _, rule in RULES:
        out.update(rule(sd, config))
    return out


def convert(sd: Mapping[str, torch.Tensor], branches: list[LLMBranch], heads: int = PIXART_HEADS,
            resolution: int | None = None, seed: int = 0, dtype: torch.dtype | None = None,
            prediction: str = "eps") -> LIDiTModel:
    """An LI-DiT model: PixArt's backbone and null context, and a fresh LLM pathway for `branches`,
    in `dtype` (default: the dtype PixArt's weights are stored in)."""
    config = pixart_config(sd, branches, heads, resolution, prediction)
    torch.manual_seed(seed)
    model = LIDiTModel(config, dtype=dtype or sd["t_block.1.weight"].dtype).init_weights()
    backbone = convert_backbone(sd, config)
    expected = model.state_dict()
    for key, value in backbone.items():
        if key not in expected or expected[key].shape != value.shape:
            raise PixArtError(f"converted weight {key!r} {tuple(value.shape)} does not fit the LI-DiT model "
                              f"({tuple(expected[key].shape) if key in expected else 'no such weight'})")
    model.load_state_dict(backbone, strict=False)
    return model


# --------------------------------------------------------------------------------------------------
# the pathway file
# --------------------------------------------------------------------------------------------------
def is_pathway_key(key: str) -> bool:
    """The LLM pathway: everything of `text.*` and every block's cross-attention K/V projection."""
    return key.startswith("text.") or bool(_KV.match(key))


def save_pathway(path: str | os.PathLike, model: LIDiTModel, extra: Mapping[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if is_pathway_key(k)}
    save_file(tensors, os.fspath(path), metadata={"format": PATHWAY_FORMAT, "lidit_config": model.config.to_json(),
                                                 **(extra or {})})


def read_pathway(path: str | os.PathLike) -> tuple[LIDiTConfig, dict[str, torch.Tensor]]:
    name = os.path.basename(path)
    _, header, metadata = read_header(path)
    if metadata.get("format") != PATHWAY_FORMAT:
        raise PixArtError(f"{name} is not an LI-DiT pathway file (its metadata format is {metadata.get('format')!r}, "
                          f"not {PATHWAY_FORMAT!r}): write one with `python -m lidit convert pixart ... --pathway`")
    config = config_of(metadata, name)
    stray = sorted(k for k in header if not is_pathway_key(k))
    if stray:
        raise PixArtError(f"{name} holds weights outside the LLM pathway, e.g. {stray[0]!r}")
    return config, load_file(path)


def join_pathway(sd: Mapping[str, torch.Tensor], pathway: str | os.PathLike) -> tuple[LIDiTConfig, dict[str, torch.Tensor]]:
    """A whole LI-DiT state dict: the backbone converted from PixArt, the pathway from its file (its
    K/V and null context replace PixArt's). The pathway's config must describe this backbone."""
    config, tensors = read_pathway(pathway)
    want = pixart_config(sd, list(config.text.branches), config.dit.heads, config.resolution).dit
    if dataclasses.replace(want, pe_interpolation=config.dit.pe_interpolation) != config.dit:
        raise PixArtError(f"{os.path.basename(pathway)} was made for another backbone ({config.dit}) than this "
                          f"PixArt's ({want})")
    return config, {**convert_backbone(sd, config), **tensors}


def branches_of(specs: list[str]) -> list[LLMBranch]:
    """`--llm FOLDER` (name and hidden size from its config.json) or `NAME:HIDDEN`."""
    out = []
    for spec in specs:
        folder = Path(spec)
        if (folder / "config.json").is_file():
            cfg = json.loads((folder / "config.json").read_text())
            hidden = cfg.get("hidden_size") or cfg.get("text_config", {}).get("hidden_size")
            out.append(LLMBranch(folder.name, int(hidden)))
        elif re.fullmatch(r"[^:]+:\d+", spec):
            name, hidden = spec.rsplit(":", 1)
            out.append(LLMBranch(name, int(hidden)))
        else:
            raise SystemExit(f"{spec!r} is neither an LLM folder (with config.json) nor NAME:HIDDEN_SIZE")
    return out


def main(argv: list[str] | None = None) -> LIDiTModel:
    parser = argparse.ArgumentParser(prog="python -m lidit convert pixart",
                                     description="Convert a PixArt-alpha or -Sigma transformer into an LI-DiT checkpoint "
                                                 "(or a pathway file), with a fresh LLM pathway for the LLMs named.")
    parser.add_argument("file", help="PixArt weights: .safetensors (PixArt's or diffusers' key names) or .pth")
    parser.add_argument("--out", required=True, help="the LI-DiT checkpoint (or, with --pathway, pathway file) to write")
    parser.add_argument("--llm", action="append", required=True, metavar="FOLDER|NAME:HIDDEN",
                        help="one per LLM branch, in order: an HF folder, or a name and hidden size")
    parser.add_argument("--heads", type=int, default=PIXART_HEADS, help="attention heads (PixArt's: 16)")
    parser.add_argument("--resolution", type=int, help="training size in pixels; also where alpha-1024's "
                        "micro-conditions are folded in (default 1024, or the size of a pos_embed)")
    parser.add_argument("--pathway", action="store_true", help="write only the LLM pathway (refiners, K/V, null "
                        "context), to join with the PixArt MODEL in ComfyUI (LI-DiT From PixArt)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh pathway")
    parser.add_argument("--prediction", choices=("eps", "v"), default="eps", help="what the network predicts: "
                        "PixArt's own checkpoints the noise (eps); v for a PixArt-architecture model trained on v")
    args = parser.parse_args(argv)
    model = convert(read_pixart(args.file), branches_of(args.llm), args.heads, args.resolution, args.seed,
                    prediction=args.prediction)
    extra = {"converted_from": os.path.basename(args.file)}
    if args.pathway:
        save_pathway(args.out, model, extra)
    else:
        from .checkpoint import save_checkpoint
        save_checkpoint(args.out, model, extra)
    n = sum(v.numel() for k, v in model.state_dict().items() if is_pathway_key(k))
    print(f"wrote {args.out}: PixArt backbone ({model.config.dit.depth} blocks, width {model.config.dit.hidden}, "
          f"{model.config.latent_format} latents), LLM pathway of {n / 1e6:.1f} M values for "
          f"{', '.join(b.name for b in model.config.text.branches)}")
    return model


def pathway_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lidit convert pathway",
                                     description="Keep only the LLM pathway of an LI-DiT checkpoint (e.g. one trained "
                                                 "from a converted PixArt), for LI-DiT From PixArt and for sharing.")
    parser.add_argument("checkpoint")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from .checkpoint import load_checkpoint, read_metadata

    extra = {k: v for k, v in read_metadata(args.checkpoint).items() if k.startswith("training_")}
    save_pathway(args.out, load_checkpoint(args.checkpoint), {**extra, "pathway_of": os.path.basename(args.checkpoint)})
    print(f"wrote {args.out}: the LLM pathway of {args.checkpoint}")
