"""LI-DiT's attention routed through ComfyUI's, as core models do.

`optimized_attention` is whatever the user started ComfyUI with (sage, flash, xformers, PyTorch
SDPA, sub-quadratic) and honours `optimized_attention_override` from transformer_options. A mask
is passed only where there is padding, so the mask-free (flash) kernels stay eligible.

ComfyUI's ops check for an interrupt at every layer, but one attention call is not a layer: a
4096 px image at patch 8 is 262,144 tokens, one call of which runs for minutes with no way to stop
it and holds its scores all at once. A call whose score matrix would exceed `CHUNK_SCORES` runs
over chunks of queries instead, checking for an interrupt between them.

Attention patches: ComfyUI keys them on UNet blocks. `("middle", 0)` of `attn1`, the self-attention
that PerturbedAttentionGuidance replaces, maps to the self-attention of LI-DiT's middle DiT block.
Other UNet keys have no counterpart here, so they are reported once and left alone.
"""
from __future__ import annotations

import logging

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management as mm

from ..lidit.layers import Attend, Site

MIDDLE = ("middle", 0)
#: batch x heads x queries x keys of one attention call at most (2^26 fp32 scores: 256 MiB)
CHUNK_SCORES = 1 << 26
_reported: set = set()


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """True = attend -> 0, False -> a large finite negative. Finite, so chunked kernels that see a
    fully padded chunk of keys stay NaN-free (every row has at least one real key)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min / 2)


def host_attend(transformer_options: dict, depth: int) -> Attend:
    replace = transformer_options.get("patches_replace", {})
    self_patch = replace.get("attn1", {}).get(MIDDLE)
    ignored = sorted((name, str(key)) for name, patches in replace.items() if name in ("attn1", "attn2")
                     for key in patches if (name, key) != ("attn1", MIDDLE))
    if ignored and tuple(ignored) not in _reported:
        _reported.add(tuple(ignored))
        logging.warning("LI-DiT: ignoring attention patches for UNet blocks it does not have: %s. Only attn1 "
                        "('middle', 0), as PerturbedAttentionGuidance uses, maps to LI-DiT (its middle DiT block).",
                        ", ".join(f"{name} {key}" for name, key in ignored))

    def host(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if bias is None:
            return comfy_attention.optimized_attention(q, k, v, q.shape[1], skip_reshape=True,
                                                       transformer_options=transformer_options)
        return comfy_attention.optimized_attention_masked(q, k, v, q.shape[1], bias, skip_reshape=True,
                                                          transformer_options=transformer_options)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, site: Site) -> torch.Tensor:
        if self_patch is not None and site == ("dit", depth // 2, "self"):
            flat = [x.transpose(1, 2).flatten(2) for x in (q, k, v)]
            options = {**transformer_options, "n_heads": q.shape[1], "dim_head": q.shape[-1], "block": MIDDLE,
                       "block_index": 0, "attn_precision": None}
            return self_patch(*flat, options)
        bias = None if mask is None else additive(mask, q.dtype)
        rows = max(1, CHUNK_SCORES // (q.shape[0] * q.shape[1] * k.shape[2]))
        if q.shape[2] <= rows:
            return host(q, k, v, bias)
        out = []
        for start in range(0, q.shape[2], rows):
            mm.throw_exception_if_processing_interrupted()
            out.append(host(q[:, :, start:start + rows], k, v, bias))
        return torch.cat(out, dim=1)
    return attend
