"""What an LLM hands to the text pathway: hidden states plus two masks.

`mask` marks real tokens (False = padding). `prompt` marks the user's own prompt tokens; every
other real token (system prompt, chat template, instruction) is scaffolding that the pathway
attends to and then drops, so the DiT only ever sees the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def pack_left(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the kept tokens of each row to the front (order preserved) and cut the common tail."""
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    keep = torch.gather(keep, 1, order)
    x = torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[-1]))
    n = int(keep.sum(1).max()) if keep.numel() else 0
    return x[:, :n] * keep[:, :n, None].to(x.dtype), keep[:, :n]


@dataclass
class TextStates:
    hidden: torch.Tensor  # (B, L, D)
    mask: torch.Tensor    # (B, L) bool
    prompt: torch.Tensor  # (B, L) bool, subset of mask

    @property
    def hidden_size(self) -> int:
        return self.hidden.shape[-1]

    def only_prompt(self) -> "TextStates":
        """Crop the scaffolding right away (HunyuanVideo's order)."""
        hidden, keep = pack_left(self.hidden, self.prompt)
        return TextStates(hidden, keep, keep.clone())

    def to(self, device=None, dtype=None) -> "TextStates":
        return TextStates(self.hidden.to(device=device, dtype=dtype), self.mask.to(device), self.prompt.to(device))

    def __getitem__(self, index) -> "TextStates":
        return TextStates(self.hidden[index], self.mask[index], self.prompt[index])

    @staticmethod
    def cat(items: list["TextStates"]) -> "TextStates":
        """Batch prompts of different lengths by right-padding (e.g. cond + uncond for CFG)."""
        n = max(t.hidden.shape[1] for t in items)

        def pad(x: torch.Tensor) -> torch.Tensor:
            extra = n - x.shape[1]
            return F.pad(x, (0, 0, 0, extra)) if x.dim() == 3 else F.pad(x, (0, extra))

        return TextStates(torch.cat([pad(t.hidden) for t in items]),
                          torch.cat([pad(t.mask) for t in items]),
                          torch.cat([pad(t.prompt) for t in items]))
