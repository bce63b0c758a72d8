"""The LI-DiT backbone (paper §3.2): patchify, conv ResBlock position, cross-attention DiT blocks.

Each block is self-attention, then cross-attention to the text, then an FFN. AdaLN (shift, scale,
gate for the self-attention and the FFN) comes from the timestep embedding plus the pooled text.
Position comes from a 3x3 conv ResBlock right after patchify (zero padding tells tokens where the
borders are), so any height and width that are multiples of the patch size work. A fixed sin-cos
table before it is an optional extra (`DiTConfig.pos_table`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import DiTConfig
from .layers import MLP, Attend, Attention, Ops, TimestepEmbedder, TorchOps, layer_norm, modulate, sdpa
from .refiner import TextContext


def sincos_2d(dim: int, h: int, w: int, device=None) -> torch.Tensor:
    """(h*w, dim) table; half the channels encode the row, half the column (as in MAE/DiT)."""
    def axis(n: int, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float32, device=device) / (d // 2))
        args = torch.arange(n, dtype=torch.float32, device=device)[:, None] * omega[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    rows = axis(h, dim // 2)[:, None].expand(h, w, -1)
    cols = axis(w, dim // 2)[None].expand(h, w, -1)
    return torch.cat([rows, cols], dim=-1).reshape(h * w, dim)


class ConvPosEmbed(nn.Module):
    """x + conv(silu(conv(silu(x)))) on the patch grid."""

    def __init__(self, dim: int, ops: Ops = TorchOps, dtype=None, device=None) -> None:
        super().__init__()
        self.conv1 = ops.Conv2d(dim, dim, 3, padding=1, dtype=dtype, device=device)
        self.conv2 = ops.Conv2d(dim, dim, 3, padding=1, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, context_dim: int, ops: Ops = TorchOps, dtype=None, device=None) -> None:
        super().__init__()
        f = dict(ops=ops, dtype=dtype, device=device)
        self.self_attn = Attention(cfg.hidden, cfg.heads, **f)
        self.cross_attn = Attention(cfg.hidden, cfg.heads, context_dim=context_dim, **f)
        self.mlp = MLP(cfg.hidden, cfg.mlp_ratio, **f)
        self.adaln = ops.Linear(cfg.hidden, 6 * cfg.hidden, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: TextContext, index: int, attend: Attend) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(F.silu(c)).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.self_attn(modulate(layer_norm(x), shift1, scale1), ("dit", index, "self"), attend)
        x = x + self.cross_attn(layer_norm(x), ("dit", index, "cross"), attend, text.tokens, text.key_mask)
        return x + gate2[:, None] * self.mlp(modulate(layer_norm(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig, ops: Ops = TorchOps, dtype=None, device=None) -> None:
        super().__init__()
        self.adaln = ops.Linear(cfg.hidden, 2 * cfg.hidden, dtype=dtype, device=device)
        self.linear = ops.Linear(cfg.hidden, cfg.patch ** 2 * cfg.in_channels, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
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
        self.pooled_proj = ops.Linear(context_dim, cfg.hidden, dtype=dtype, device=device)
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
            tokens = tokens + rearrange(sincos_2d(self.cfg.hidden, h, w, x.device), "(h w) d -> d h w", h=h).to(tokens.dtype)
        tokens = rearrange(self.pos_embed(tokens), "b d h w -> b (h w) d")
        c = self.t_embedder(t, tokens.dtype) + self.pooled_proj(text.pooled)
        for i, block in enumerate(self.blocks):
            if self.checkpointing and torch.is_grad_enabled():  # keep only block inputs; recompute in backward
                tokens = checkpoint(block, tokens, c, text, i, attend, use_reentrant=False)
            else:
                tokens = block(tokens, c, text, i, attend)
        out = rearrange(self.final(tokens, c), "b (h w) (p q c) -> b c (h p) (w q)", h=h, p=p, q=p)
        return out[..., :height, :width]
