"""LIDiTModel: the text pathway and the DiT as one module, the unit a checkpoint holds.

The text pathway depends on the timestep, so it runs inside every model call: the frozen LLMs
run once per prompt, the refiners once per sampling step, where t is known.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from .config import LIDiTConfig
from .dit import LIDiTBackbone
from .layers import Attend, Ops, TorchOps, sdpa
from .refiner import TextContext, TextPathway
from .states import PreparedBranch, TextStates

X_PARAM_T_MIN = 0.05  # below this the derived velocity (x_t - x0) / t would amplify errors


class LIDiTModel(nn.Module):
    def __init__(self, config: LIDiTConfig, ops: Ops = TorchOps, dtype=None, device=None) -> None:
        super().__init__()
        self.config = config
        self.text = TextPathway(config.text, ops, dtype, device)
        self.dit = LIDiTBackbone(config.dit, config.text.width, ops, dtype, device)

    def forward(self, x: torch.Tensor, t: torch.Tensor, texts: list[TextStates] | list[PreparedBranch] | None,
                attend: Attend = sdpa, context: TextContext | None = None) -> torch.Tensor:
        """t in [0, 1] (DDPM index / 1000, or the flow time). Returns the config's prediction.

        `texts`: each branch's LLM states, or their `prepare`d form, which a sampler makes once
        per run (in x's dtype, the compute dtype). With `x_param` the network predicts the clean
        image and this returns the velocity derived from it, so samplers and hosts only ever see a
        plain flow model. `context` replaces the text pathway (PixArt's own caption tokens, for the
        distillation teacher: through the root module, so FSDP's hooks run as in any forward).
        """
        if context is None:
            branches = [*texts] if isinstance(texts[0], PreparedBranch) else self.text.prepare(texts, x.dtype)
            context = self.text(branches, t, attend)
        out = self.dit(x, t, context, attend)
        if self.config.x_param:
            t_ = t.to(out.dtype).clamp(min=X_PARAM_T_MIN).view(-1, *([1] * (x.dim() - 1)))
            out = (x.to(out.dtype) - out) / t_
        return out

    @torch.no_grad()
    def init_weights(self) -> LIDiTModel:
        """Xavier everywhere, N(0, 0.02) for the timestep MLPs, then zero what `zero_initialised` lists."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for embedder in (self.text.t_embedder, self.dit.t_embedder):
            nn.init.normal_(embedder.fc1.weight, std=0.02)
            nn.init.normal_(embedder.fc2.weight, std=0.02)
        for zero in self.zero_initialised():
            for p in [zero] if isinstance(zero, nn.Parameter) else zero.parameters():
                nn.init.zeros_(p)
        return self

    def zero_initialised(self) -> list[nn.Module | nn.Parameter]:
        """What starts at zero, found by attribute (a renamed attribute fails here loudly).

        Zero gates make every token refiner and collaborative block an identity at the start (the
        paper's zero-initialised gating); zero AdaLN makes every DiT block's self-attention and FFN
        branches vanish (DiT's adaLN-Zero), and the zero final projection makes the first output 0.
        With adaLN-single and the final table, the shared Linear and the tables start at zero.
        """
        text, dit = self.text, self.dit
        single = dit.cfg.adaln == "single"
        return [*(block.gates for refiner in text.refiners for block in refiner.blocks),
                *(block.gates for collab in text.collab for block in collab.branches),
                *([dit.t_block, *(block.scale_shift_table for block in dit.blocks)] if single
                  else [block.adaln for block in dit.blocks]),
                dit.final.scale_shift_table if dit.cfg.final_modulation == "table" else dit.final.adaln,
                dit.final.linear]


def parameter_counts(config: LIDiTConfig) -> dict[str, int]:
    """Per top-level part, counted on the meta device so even the 10B preset costs no memory."""
    with torch.device("meta"):
        model = LIDiTModel(config)
    counts: Counter[str] = Counter()
    for name, p in model.named_parameters():
        parts = name.split(".")
        counts[".".join(parts[:2])] += p.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    return dict(counts)
