"""The LI-DiT backbone (paper §3.2): patchify, conv ResBlock position, cross-attention DiT blocks.

Each block is self-attention, then cross-attention to the text, then an FFN. AdaLN (shift, scale,
gate for the self-attention and the FFN) comes from the timestep embedding plus the pooled text.
Position comes from a 3x3 conv ResBlock right after patchify (zero padding tells tokens where the
borders are), so any height and width that are multiples of the patch size work. A fixed sin-cos
table before it is an optional extra (`DiTConfig.pos_table`).

The switches of `DiTConfig` (QK-norm, the cross-attention's query norm, PixArt's table rule,
adaLN-single, the final layer's table modulation, the pooled path) default to the paper's choices;
together they make this backbone compute exactly what PixArt-alpha and -Sigma compute
(`lidit.pixart`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import DiTConfig
from .layers import MLP, Attend, Attention, Ops, TimestepEmbedder, TorchOps, gated, layer_norm, modulate, sdpa
from .refiner import TextContext


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(n, dim): [sin, cos] of the positions at dim / 2 frequencies (MAE's and PixArt's operation order)."""
    omega = torch.arange(dim // 2, dtype=positions.dtype, device=positions.device) / (dim / 2.0)
    args = positions.reshape(-1)[:, None] * (1.0 / 10000 ** omega)[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def sincos_2d(dim: int, h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h*w, dim) table of integer positions; half the channels encode the row, half the column
    (as in MAE/DiT)."""
    rows, cols = torch.meshgrid(torch.arange(h, dtype=dtype, device=device), torch.arange(w, dtype=dtype, device=device),
                                indexing="ij")
    return torch.cat([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], dim=1)


def pixart_sincos_2d(dim: int, h: int, w: int, pe_interpolation: float | None, patch: int, device=None,
                     dtype=torch.float32) -> torch.Tensor:
    """PixArt's table: the grid scaled to a base size and by `pe_interpolation`, columns first.

    As ComfyUI's PixArtMS computes it: the base size and, when None, the interpolation come from the
    mean side in latent pixels (the base size rounds to 0 below a mean side of 33).
    """
    mean_side = (h + w) * patch // 2
    if pe_interpolation is None:
        pe_interpolation = round(mean_side / (512 / 8.0), 0)
    base = (round(mean_side / 64) * 64) // patch
    if base == 0:
        raise ValueError(f"PixArt's position table has no base size below a mean side of 33 latent pixels (264 px "
                         f"for 8x latents); this image has {mean_side}: sample larger")
    rows, cols = torch.meshgrid(torch.arange(h, dtype=dtype, device=device) / (h / base) / pe_interpolation,
                                torch.arange(w, dtype=dtype, device=device) / (w / base) / pe_interpolation,
                                indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


class ConvPosEmbed(nn.Module):
    """x + conv(silu(conv(silu(x)))) on the patch grid."""

    def __init__(self, dim: int, ops: Ops = TorchOps, dtype=None, device=None) -> None:
        super().__init__()
        self.conv1 = ops.Conv2d(dim, dim, 3, padding=1, dtype=dtype, device=device)
        self.conv2 = ops.Conv2d(dim, dim, 3, padding=1, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class DiTBlock(nn.Module):
    """`m`, the modulation input: SiLU(c) for a per-block AdaLN, the shared Linear's output for
    adaLN-single (to which each block adds its own table)."""

    def __init__(self, cfg: DiTConfig, context_dim: int, ops: Ops = TorchOps, dtype=None, device=None) -> None:
        super().__init__()
        f = dict(ops=ops, dtype=dtype, device=device)
        self.self_attn = Attention(cfg.hidden, cfg.heads, qk_norm=cfg.qk_norm, **f)
        self.cross_attn = Attention(cfg.hidden, cfg.heads, context_dim=context_dim, qk_norm=cfg.qk_norm, **f)
        self.mlp = MLP(cfg.hidden, cfg.mlp_ratio, **f)
        self.cross_query_norm = cfg.cross_query_norm
        if cfg.adaln == "single":
            self.scale_shift_table = nn.Parameter(torch.zeros(6, cfg.hidden, dtype=dtype, device=device))
        else:
            self.adaln = ops.Linear(cfg.hidden, 6 * cfg.hidden, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, m: torch.Tensor, text: TextContext, index: int, attend: Attend) -> torch.Tensor:
        if hasattr(self, "scale_shift_table"):
            m = (self.scale_shift_table.to(m)[None] + m.view(m.shape[0], 6, -1)).flatten(1)
        else:
            m = self.adaln(m)
        shift1, scale1, gate1, shift2, scale2, gate2 = m.chunk(6, dim=-1)
        x = gated(x, gate1[:, None], self.self_attn(modulate(layer_norm(x), shift1, scale1), ("dit", index, "self"), attend))
        query = layer_norm(x) if self.cross_query_norm else x
        kv = text.kv[index] if text.kv else None
        x = x + self.cross_attn(query, ("dit", index, "cross"), attend, text.tokens, text.key_mask, kv)
        return gated(x, gate2[:, None], self.mlp(modulate(layer_norm(x), shift2, scale2)))


class FinalLayer(nn.Module):
    """Shift and scale from a Linear on SiLU(c), or ("table") a learned table plus c itself."""

    def __init__(self, cfg: DiTConfig, ops: Ops = TorchOps, dtype=None, device=None) -> None:
        super().__init__()
        if cfg.final_modulation == "table":
            self.scale_shift_table = nn.Parameter(torch.zeros(2, cfg.hidden, dtype=dtype, device=device))
        else:
            self.adaln = ops.Linear(cfg.hidden, 2 * cfg.hidden, dtype=dtype, device=device)
        self.linear = ops.Linear(cfg.hidden, cfg.patch ** 2 * cfg.in_channels, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "scale_shift_table"):
            shift, scale = (self.scale_shift_table.to(c)[None] + c[:, None]).unbind(1)
        else:
            shift, scale = self.adaln(F.silu(c)).chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x), shift, scale))


class LIDiTBackbone(nn.Module):
    def __init__(self, cfg: DiTConfig, context_dim: int, ops: Ops = TorchOps, dtype=None, device=None) -> None:
        super().__init__()
        f = dict(ops=ops, dtype=dtype, device=device)
        self.cfg = cfg
        self.patch_embed = ops.Conv2d(cfg.in_channels, cfg.hidden, cfg.patch, stride=cfg.patch, dtype=dtype, device=device)
        self.pos_embed = ConvPosEmbed(cfg.hidden, **f)
        self.t_embedder = TimestepEmbedder(cfg.hidden, **f)
        if cfg.pooled:
            self.pooled_proj = ops.Linear(context_dim, cfg.hidden, dtype=dtype, device=device)
        if cfg.adaln == "single":
            self.t_block = ops.Linear(cfg.hidden, 6 * cfg.hidden, dtype=dtype, device=device)
        self.blocks = nn.ModuleList(DiTBlock(cfg, context_dim, **f) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg, **f)
        self.checkpointing = False  # activation checkpointing per block (training only)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextContext, attend: Attend = sdpa) -> torch.Tensor:
        """x: (B, C, H, W) with any H, W (sizes that are not multiples of the patch are padded), in the
        compute dtype, which the text context shares."""
        p, (height, width) = self.cfg.patch, x.shape[-2:]
        x = F.pad(x, (0, -width % p, 0, -height % p))
        h, w = x.shape[-2] // p, x.shape[-1] // p
        tokens = self.patch_embed(x)
        if self.cfg.pos_table:
            tokens = tokens + rearrange(self.table(h, w, tokens), "(h w) d -> d h w", h=h)
        tokens = rearrange(self.pos_embed(tokens), "b d h w -> b (h w) d")
        c = self.t_embedder(t, tokens.dtype)
        if self.cfg.pooled:
            c = c + self.pooled_proj(text.pooled)
        m = self.t_block(F.silu(c)) if self.cfg.adaln == "single" else F.silu(c)
        for i, block in enumerate(self.blocks):
            if self.checkpointing and torch.is_grad_enabled():  # keep only block inputs; recompute in backward
                tokens = checkpoint(block, tokens, m, text, i, attend, use_reentrant=False)
            else:
                tokens = block(tokens, m, text, i, attend)
        out = rearrange(self.final(tokens, c), "b (h w) (p q c) -> b c (h p) (w q)", h=h, p=p, q=p)
        return out[..., :height, :width]

    def table(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """The fixed sin-cos table of an h x w patch grid, in `like`'s dtype: float64 for an exactness
        check, the compute dtype otherwise, as PixArt makes its own."""
        cfg = self.cfg
        if cfg.pos_rule == "pixart":
            return pixart_sincos_2d(cfg.hidden, h, w, cfg.pe_interpolation, cfg.patch, like.device, like.dtype)
        return sincos_2d(cfg.hidden, h, w, like.device).to(like.dtype)
