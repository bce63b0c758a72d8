"""The LLM-infused diffuser's trainable half (paper §3.1, Fig. 5).

Per LLM, a linguistic token refiner removes the causal bias with full attention; then a
collaborative refiner lets each LLM branch read the others; then the scaffolding tokens are
dropped and the branches are concatenated along the sequence into the DiT's context.

Choices where the paper is silent:
- every branch is first standardised (`FeatureNorm`) and projected to one `width` (LLMs differ in
  hidden size and in scale);
- the gate input is the *masked* mean of the LLM features (projected) + the timestep embedding;
- gates are per residual branch (attention, FFN), computed from that vector by a zero-initialised
  Linear, so a fresh refiner is the identity on its projected input;
- the collaborative refiner is gated the same way, with each branch's own vector;
- the pooled vector for the DiT is the masked mean of the final context.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig
from .layers import MLP, Attention, Ops, TimestepEmbedder, layer_norm, masked_mean
from .text import TextStates, pack_left


class FeatureNorm(nn.Module):
    """Standardise every LLM channel with fixed statistics, then every token to unit RMS.

    LLM hidden states carry massive activations: one channel thousands of times larger than the
    rest (Gemma-3-270M's channel 163 sits near 25,000, SmolLM2-135M's largest near 540, and the
    BOS token is larger still). Fed raw into a Linear, that channel swamps both the prompt's signal
    and the gradient, and gradient clipping then throttles every other weight. The statistics are
    measured once on the training captions' features (`set_stats`) and travel in the checkpoint
    as buffers; the defaults (mean 0, std 1) leave the channels as they are. Computed in float32
    whatever the weights' dtype, because the raw values overflow float16 arithmetic.
    """

    def __init__(self, dim: int, device=None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim, device=device))
        self.register_buffer("std", torch.ones(dim, device=device))

    @torch.no_grad()
    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean.float()) / self.std.float()
        return F.rms_norm(x, (x.shape[-1],), eps=1e-6)


class GatedBlock(nn.Module):
    """Pre-norm attention + FFN whose residual branches are scaled by gates computed from `c`.

    Self-attention when called without `context` (the token refiner), cross-attention with it
    (the collaborative refiner).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, ops: Ops = nn, dtype=None, device=None) -> None:
        super().__init__()
        f = dict(ops=ops, dtype=dtype, device=device)
        self.attn = Attention(width, heads, **f)
        self.mlp = MLP(width, mlp_ratio, **f)
        self.gates = ops.Linear(width, 2 * width, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, c: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        gate_attn, gate_mlp = self.gates(F.silu(c))[:, None].chunk(2, dim=-1)
        if context is None:
            x = x + gate_attn * self.attn(layer_norm(x), key_mask=key_mask)
        elif context.shape[1]:
            x = x + gate_attn * self.attn(layer_norm(x), layer_norm(context), key_mask)
        return x + gate_mlp * self.mlp(layer_norm(x))


class LinguisticTokenRefiner(nn.Module):
    """One per LLM: bidirectional self-attention over its (causal) hidden states."""

    def __init__(self, llm_dim: int, cfg: TextConfig, ops: Ops = nn, dtype=None, device=None) -> None:
        super().__init__()
        f = dict(dtype=dtype, device=device)
        self.feature_norm = FeatureNorm(llm_dim, device=device)
        self.input_proj = ops.Linear(llm_dim, cfg.width, **f)
        self.pool_proj = ops.Linear(llm_dim, cfg.width, **f)
        self.blocks = nn.ModuleList(
            GatedBlock(cfg.width, cfg.heads, cfg.mlp_ratio, ops, **f) for _ in range(cfg.refiner_depth))

    def forward(self, text: TextStates, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the refined tokens and the (pooled text + timestep) vector `c` that gated them."""
        hidden = self.feature_norm(text.hidden).to(self.input_proj.weight.dtype)
        c = t_emb + self.pool_proj(masked_mean(hidden, text.mask))
        x = self.input_proj(hidden)
        for block in self.blocks:
            x = block(x, text.mask, c)
        return x, c


class CollaborativeBlock(nn.Module):
    """One parallel branch per LLM; branch i cross-attends to all the other branches' tokens."""

    def __init__(self, n_branches: int, cfg: TextConfig, ops: Ops = nn, dtype=None, device=None) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            GatedBlock(cfg.width, cfg.heads, cfg.mlp_ratio, ops, dtype, device) for _ in range(n_branches))

    def forward(self, xs: list[torch.Tensor], masks: list[torch.Tensor], cs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, block in enumerate(self.branches):
            others = [j for j in range(len(xs)) if j != i]
            context = torch.cat([xs[j] for j in others], dim=1) if others else xs[i][:, :0]
            context_mask = torch.cat([masks[j] for j in others], dim=1) if others else masks[i][:, :0]
            out.append(block(xs[i], context_mask, cs[i], context=context))
        return out


class TextPathway(nn.Module):
    """LLM hidden states of every branch -> DiT context tokens, their mask and a pooled vector."""

    def __init__(self, cfg: TextConfig, ops: Ops = nn, dtype=None, device=None) -> None:
        super().__init__()
        f = dict(ops=ops, dtype=dtype, device=device)
        self.drop_early = cfg.drop_instruction == "after_llm"
        self.t_embedder = TimestepEmbedder(cfg.width, **f)
        self.refiners = nn.ModuleList(LinguisticTokenRefiner(b.hidden_size, cfg, **f) for b in cfg.branches)
        self.collab = nn.ModuleList(CollaborativeBlock(len(cfg.branches), cfg, **f) for _ in range(cfg.collab_depth))

    def set_feature_stats(self, stats: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Per branch (mean, std) of its LLM's channels; see `FeatureNorm`."""
        for refiner, (mean, std) in zip(self.refiners, stats, strict=True):
            refiner.feature_norm.set_stats(mean, std)

    def forward(self, texts: list[TextStates], t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if len(texts) != len(self.refiners):
            raise ValueError(f"the model has {len(self.refiners)} LLM branches, got {len(texts)} inputs")
        if self.drop_early:
            texts = [text.only_prompt() for text in texts]
        t_emb = self.t_embedder(t)
        xs, cs = zip(*(refiner(text, t_emb) for refiner, text in zip(self.refiners, texts)))
        xs = list(xs)
        for block in self.collab:
            xs = block(xs, [text.mask for text in texts], list(cs))
        tokens, mask = pack_left(torch.cat(xs, dim=1), torch.cat([text.prompt for text in texts], dim=1))
        return tokens, mask, masked_mean(tokens, mask)
