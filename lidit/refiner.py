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
- the pooled vector for the DiT is the masked mean of the final context;
- an all-zero token carries nothing and is masked out, so an all-zero branch (ComfyUI's
  ConditioningZeroOut) means "no text", as zeros do for ComfyUI's core models.

Everything that does not depend on the timestep (the zero-token masks, FeatureNorm, the input and
pooled projections, the early instruction drop) is `prepare`d once per sampling run; the blocks run
at every step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig
from .layers import MLP, Attend, Attention, KeyMask, Ops, Site, TimestepEmbedder, TorchOps, layer_norm, masked_mean, sdpa
from .states import PreparedBranch, TextStates, pack_left, pad_tokens


class FeatureNorm(nn.Module):
    """Standardise every LLM channel with fixed statistics, then every token to unit RMS.

    LLM hidden states carry massive activations: one channel thousands of times larger than the
    rest (Gemma-3-270M's channel 163 sits near 25,000, SmolLM2-135M's largest near 540, and the
    BOS token is larger still). Fed raw into a Linear, that channel swamps both the prompt's signal
    and the gradient, and gradient clipping then throttles every other weight. The statistics are
    measured once on the training captions' features (`set_stats`) and travel in the checkpoint
    as buffers; the defaults (mean 0, std 1) leave the channels as they are. Computed in float32
    whatever the compute dtype, because the raw values overflow float16; its output (unit RMS per
    token) fits any dtype. The buffers are moved at use: hosts that stream weights per layer only
    move modules with parameters.
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
        mean, std = (b.to(x.device, torch.float32) for b in (self.mean, self.std))
        x = (x.float() - mean) / std
        return F.rms_norm(x, (x.shape[-1],), eps=1e-6)


class GatedBlock(nn.Module):
    """Pre-norm attention + FFN whose residual branches are scaled by gates computed from `c`.

    Self-attention when called without `context` (the token refiner), cross-attention with it
    (the collaborative refiner).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, ops: Ops = TorchOps, dtype=None, device=None) -> None:
        super().__init__()
        f = dict(ops=ops, dtype=dtype, device=device)
        self.attn = Attention(width, heads, **f)
        self.mlp = MLP(width, mlp_ratio, **f)
        self.gates = ops.Linear(width, 2 * width, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, c: torch.Tensor, key_mask: KeyMask, site: Site, attend: Attend,
                context: torch.Tensor | None = None) -> torch.Tensor:
        gate_attn, gate_mlp = self.gates(F.silu(c))[:, None].chunk(2, dim=-1)
        if context is None:
            x = x + gate_attn * self.attn(layer_norm(x), site, attend, key_mask=key_mask)
        elif context.shape[1]:
            x = x + gate_attn * self.attn(layer_norm(x), site, attend, layer_norm(context), key_mask)
        return x + gate_mlp * self.mlp(layer_norm(x))


class LinguisticTokenRefiner(nn.Module):
    """One per LLM: bidirectional self-attention over its (causal) hidden states."""

    def __init__(self, llm_dim: int, cfg: TextConfig, ops: Ops = TorchOps, dtype=None, device=None) -> None:
        super().__init__()
        f = dict(dtype=dtype, device=device)
        self.drop_early = cfg.drop_instruction == "after_llm"
        self.feature_norm = FeatureNorm(llm_dim, device=device)
        self.input_proj = ops.Linear(llm_dim, cfg.width, **f)
        self.pool_proj = ops.Linear(llm_dim, cfg.width, **f)
        self.blocks = nn.ModuleList(
            GatedBlock(cfg.width, cfg.heads, cfg.mlp_ratio, ops, **f) for _ in range(cfg.refiner_depth))

    def prepare(self, text: TextStates, dtype: torch.dtype) -> PreparedBranch:
        """The timestep-free part, in the compute `dtype`; `PreparedBranch.join` it with the other
        branches of its batch before use."""
        real = text.mask & text.hidden.ne(0).any(-1)
        text = TextStates(text.hidden, real, text.prompt & real)
        if self.drop_early:
            text = text.only_prompt()
        hidden = self.feature_norm(text.hidden).to(dtype)
        return PreparedBranch(self.input_proj(hidden), self.pool_proj(masked_mean(hidden, text.mask)),
                              text.mask, text.prompt, kinds=())

    def forward(self, branch: PreparedBranch, t_emb: torch.Tensor, attend: Attend = sdpa) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the refined tokens and the (pooled text + timestep) vector `c` that gated them."""
        c = t_emb + branch.pooled
        key_mask = KeyMask(branch.mask, branch.real)
        x = branch.tokens
        for i, block in enumerate(self.blocks):
            x = block(x, c, key_mask, ("refiner", i, "self"), attend)
        return x, c


class CollaborativeBlock(nn.Module):
    """One parallel branch per LLM; branch i cross-attends to all the other branches' tokens."""

    def __init__(self, n_branches: int, cfg: TextConfig, ops: Ops = TorchOps, dtype=None, device=None) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            GatedBlock(cfg.width, cfg.heads, cfg.mlp_ratio, ops, dtype, device) for _ in range(n_branches))

    def forward(self, xs: list[torch.Tensor], branches: list[PreparedBranch], cs: list[torch.Tensor],
                index: int, attend: Attend = sdpa) -> list[torch.Tensor]:
        out = []
        for i, block in enumerate(self.branches):
            others = [j for j in range(len(xs)) if j != i]
            context = torch.cat([xs[j] for j in others], dim=1) if others else xs[i][:, :0]
            mask = torch.cat([branches[j].mask for j in others], dim=1) if others else branches[i].mask[:, :0]
            real = [sum(row) for row in zip(*(branches[j].real for j in others))] if others else [0]
            key_mask = KeyMask(mask, real)
            out.append(block(xs[i], cs[i], key_mask, ("collab", index, "cross"), attend, context=context))
        return out


class TextContext:
    """The DiT's text input: the prompt tokens of every branch, left-packed, and their pooled vector.
    `kv`: per DiT block, a cross-attention K/V (weight, bias) to use instead of the block's own (the
    PixArt distillation teacher's, which the student's training must not move)."""

    def __init__(self, tokens: torch.Tensor, mask: torch.Tensor, lengths: list[int],
                 kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.tokens, self.mask, self.kv = tokens, mask, kv
        self.key_mask = KeyMask(mask, lengths)
        self.pooled = masked_mean(tokens, mask)


class TextPathway(nn.Module):
    """LLM hidden states of every branch -> DiT context tokens, their mask and a pooled vector."""

    def __init__(self, cfg: TextConfig, ops: Ops = TorchOps, dtype=None, device=None) -> None:
        super().__init__()
        f = dict(ops=ops, dtype=dtype, device=device)
        self.t_embedder = TimestepEmbedder(cfg.width, **f)
        self.refiners = nn.ModuleList(LinguisticTokenRefiner(b.hidden_size, cfg, **f) for b in cfg.branches)
        self.collab = nn.ModuleList(CollaborativeBlock(len(cfg.branches), cfg, **f) for _ in range(cfg.collab_depth))
        if cfg.null_tokens:
            self.null = nn.Parameter(torch.zeros(cfg.null_tokens, cfg.width, dtype=dtype, device=device))

    def set_feature_stats(self, stats: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Per branch (mean, std) of its LLM's channels; see `FeatureNorm`."""
        for refiner, (mean, std) in zip(self.refiners, stats, strict=True):
            refiner.feature_norm.set_stats(mean, std)

    def prepare(self, texts: list[TextStates], dtype: torch.dtype) -> list[PreparedBranch]:
        """Everything that does not depend on t: once per sampling run, not once per step."""
        if len(texts) != len(self.refiners):
            raise ValueError(f"the model has {len(self.refiners)} LLM branches, got {len(texts)} inputs")
        return PreparedBranch.join([refiner.prepare(text, dtype) for refiner, text in zip(self.refiners, texts)])

    def forward(self, branches: list[PreparedBranch], t: torch.Tensor, attend: Attend = sdpa) -> TextContext:
        t_emb = self.t_embedder(t, branches[0].tokens.dtype)
        xs, cs = zip(*(refiner(branch, t_emb, attend) for refiner, branch in zip(self.refiners, branches)))
        xs = list(xs)
        for i, block in enumerate(self.collab):
            xs = block(xs, branches, list(cs), i, attend)
        lengths = [sum(row) for row in zip(*(b.prompt_lengths for b in branches))]  # per kind of row
        # at least one (masked) token: a batch of empty prompts still reaches every refiner weight, so
        # DDP sees them all used (a zero-length context would leave them out of the graph)
        tokens, mask = pack_left(torch.cat(xs, dim=1), torch.cat([b.prompt for b in branches], dim=1),
                                 max(1, *lengths))
        if hasattr(self, "null") and 0 in lengths:  # the empty prompt of CFG: the learned null context
            tokens, mask, lengths = fill_empty(tokens, mask, lengths, self.null)
        return TextContext(tokens, mask, lengths)


def fill_empty(tokens: torch.Tensor, mask: torch.Tensor, lengths: list[int],
               null: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The rows without a real token replaced by the `null` tokens (N, width), all attended to.
    `lengths`: real tokens per row, or per kind of row; returned as they are after the filling."""
    n = null.shape[0]
    width = max(tokens.shape[1], n)
    tokens, mask = pad_tokens(tokens, width), pad_tokens(mask, width)
    empty = ~mask.any(-1)
    null_mask = pad_tokens(torch.ones(1, n, dtype=torch.bool, device=tokens.device), width)
    tokens = torch.where(empty[:, None, None], pad_tokens(null.to(tokens)[None], width), tokens)
    mask = torch.where(empty[:, None], null_mask, mask)
    return tokens, mask, [n if k == 0 else k for k in lengths]
