"""Building blocks shared by the text pathway and the DiT.

Every module takes `ops` (a namespace with Linear/Conv2d, `torch.nn` by default) plus `dtype`
and `device`, so a host such as ComfyUI can build the same network from its own layer classes
(which skip random init and cast weights on the fly) without this package knowing the host.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Ops = Any  # a module namespace providing Linear and Conv2d, e.g. torch.nn or comfy.ops.*


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA over (B, heads, L, head_dim) with a (B, Lk) key mask, True = attend.

    A row with no valid key at all (an empty prompt) attends to nothing and returns zeros,
    instead of the NaN that a fully masked softmax gives.
    """
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    if k.shape[-2] == 0:
        return q.new_zeros(*q.shape[:-1], v.shape[-1])
    has_key = key_mask.any(dim=-1)
    safe = (key_mask | ~has_key[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe)
    return torch.where(has_key[:, None, None, None], out, 0.0)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype=None, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free LayerNorm: every norm here is followed by a learned modulation or gate."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


class Attention(nn.Module):
    """Multi-head attention with QK-RMSNorm; cross-attention when `context` is given."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None,
                 ops: Ops = nn, dtype=None, device=None) -> None:
        super().__init__()
        f = dict(dtype=dtype, device=device)
        self.heads = heads
        self.q = ops.Linear(dim, dim, **f)
        self.kv = ops.Linear(context_dim or dim, 2 * dim, **f)
        self.q_norm = RMSNorm(dim // heads, **f)
        self.k_norm = RMSNorm(dim // heads, **f)
        self.out = ops.Linear(dim, dim, **f)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        context = x if context is None else context
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(self.q_norm(q), self.k_norm(k), v, key_mask)
        return self.out(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float, ops: Ops = nn, dtype=None, device=None) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = ops.Linear(dim, hidden, dtype=dtype, device=device)
        self.fc2 = ops.Linear(hidden, dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t in [0, 1] (scaled to 0..1000, as DDPM indices), then an MLP."""

    def __init__(self, dim: int, freq_dim: int = 256, ops: Ops = nn, dtype=None, device=None) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = ops.Linear(freq_dim, dim, dtype=dtype, device=device)
        self.fc2 = ops.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(emb)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens only, so padding never changes a prompt's pooled vector."""
    w = mask.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)
