"""Building blocks shared by the text pathway and the DiT.

Hosting contract (how ComfyUI, or any host, runs this network without this package knowing it):
- every module takes `ops` (a namespace with Linear, Conv2d and RMSNorm; `TorchOps` by default),
  plus `dtype` and `device`, so a host can build it from its own layer classes, which skip random
  init and cast stored weights (fp8, fp16, offloaded) to the input's dtype and device per call;
- every forward computes in the dtype of its input, never in the weights' storage dtype;
- every attention goes through an `Attend` function handed in per call, so a host can route it to
  its own kernels and patches. `sdpa` is the default.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

Ops = Any  # a namespace providing Linear, Conv2d and RMSNorm, e.g. TorchOps or comfy.ops.*
#: where an attention sits: (stage, block index, kind), e.g. ("dit", 3, "self"); hosts key patches on it
Site = tuple[Literal["refiner", "collab", "dit"], int, Literal["self", "cross"]]


class Attend(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 site: Site) -> torch.Tensor:
        """q, k, v: (B, heads, L, head_dim); mask: None (attend everywhere) or a (B, 1, 1, Lk) bool key
        mask, True = attend, with at least one True per row. Returns (B, Lq, heads * head_dim)."""


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, site: Site) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


class KeyMask:
    """A (B, Lk) padding mask, turned once per forward into what each attention call needs.

    `attend` is None unless some row is partly padded, so hosts can pick mask-free (flash) kernels:
    a row without any real key (an empty prompt, as CFG's empty negative next to a prompt) attends
    to everything and has its values zeroed, which zeroes its output exactly, instead of the NaN that
    a fully masked softmax gives. The values (Lk keys) are fewer than the outputs (Lq queries).
    `real` (real keys per row, or per kind of row: only which counts occur matters) is known on the
    host side (Python ints), so no device sync. A superset of the counts that occur is safe: it can
    only ask for the mask, or for the zeroing, where neither was needed.
    """

    def __init__(self, mask: torch.Tensor, real: Sequence[int]) -> None:
        partial = any(0 < n < mask.shape[1] for n in real)
        self.attend = (mask | ~mask.any(-1, keepdim=True))[:, None, None, :] if partial else None
        self.keep_rows = mask.any(-1)[:, None, None, None] if 0 in real else None

    def zero_empty(self, values: torch.Tensor) -> torch.Tensor:
        """(B, Lk, heads, head_dim) values with the rows that have no real key zeroed."""
        return values if self.keep_rows is None else values * self.keep_rows.to(values.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, in x's dtype. On the CPU torch's rms_norm is a composite of five
    full passes (a float32 copy of a bf16 input, pow, mean, two products); this is one reduction
    (accumulated in float32 at least) and two products. Elsewhere torch's fused kernel."""
    if x.device.type != "cpu":
        return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)
    acc = torch.promote_types(x.dtype, torch.float32)
    inv = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc).square() / x.shape[-1] + eps)
    return (x * inv * weight).to(x.dtype)  # out of place: autograd keeps x * inv for the weight's gradient


class RMSNorm(nn.Module):
    """RMSNorm in the input's dtype (`rms_norm`; torch's own module falls off its fused path on mixed
    dtypes)."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype=None, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class TorchOps:
    """The default `ops`: plain torch layers."""
    Linear = nn.Linear
    Conv2d = nn.Conv2d
    RMSNorm = RMSNorm


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free LayerNorm: every norm here is followed by a learned modulation or gate."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


class Attention(nn.Module):
    """Multi-head attention with QK-RMSNorm (unless `qk_norm` is off); cross-attention when
    `context` is given."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qk_norm: bool = True,
                 ops: Ops = TorchOps, dtype=None, device=None) -> None:
        super().__init__()
        f = dict(dtype=dtype, device=device)
        self.heads = heads
        self.q = ops.Linear(dim, dim, **f)
        self.kv = ops.Linear(context_dim or dim, 2 * dim, **f)
        self.q_norm = ops.RMSNorm(dim // heads, eps=1e-6, **f) if qk_norm else nn.Identity()
        self.k_norm = ops.RMSNorm(dim // heads, eps=1e-6, **f) if qk_norm else nn.Identity()
        self.out = ops.Linear(dim, dim, **f)

    def forward(self, x: torch.Tensor, site: Site, attend: Attend = sdpa, context: torch.Tensor | None = None,
                key_mask: KeyMask | None = None, kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`kv`: a K/V projection's (weight, bias) to use instead of this layer's own (a distillation
        teacher's), in the queries' dtype."""
        b, n, d = x.shape
        context = x if context is None else context
        if context.shape[1] == 0:  # nothing to attend to: the attention contributes nothing
            return self.out(x.new_zeros(b, n, d))
        # QK-norm over head_dim before moving heads forward, while that dim is still contiguous
        q = self.q_norm(self.q(x).view(b, n, self.heads, -1)).transpose(1, 2)
        kv_out = self.kv(context) if kv is None else F.linear(context.to(q.dtype), *(w.to(q.dtype) for w in kv))
        k, v = kv_out.view(b, context.shape[1], 2, self.heads, d // self.heads).unbind(2)
        mask = None
        if key_mask is not None:
            v, mask = key_mask.zero_empty(v), key_mask.attend
        return self.out(attend(q, self.k_norm(k).transpose(1, 2), v.transpose(1, 2), mask, site))


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float, ops: Ops = TorchOps, dtype=None, device=None) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = ops.Linear(dim, hidden, dtype=dtype, device=device)
        self.fc2 = ops.Linear(hidden, dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t in [0, 1] (scaled to 0..1000, as DDPM indices), then an MLP."""

    def __init__(self, dim: int, freq_dim: int = 256, ops: Ops = TorchOps, dtype=None, device=None) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = ops.Linear(freq_dim, dim, dtype=dtype, device=device)
        self.fc2 = ops.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`dtype`: the compute dtype (the features are made in float32)."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype)
        return self.fc2(F.silu(self.fc1(emb)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift per row, in one pass over x."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


def gated(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """The gated residual x + gate * branch, in one pass (`gate` broadcasts against `branch`)."""
    return torch.addcmul(x, gate, branch)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens only, so padding never changes a prompt's pooled vector."""
    w = mask.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)
