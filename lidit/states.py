"""What an LLM hands to the text pathway, and what the pathway keeps of it across sampling steps.

`TextStates`: an LLM's hidden states plus two masks. `mask` marks real tokens (False = padding).
`prompt` marks the user's own prompt tokens; every other real token (system prompt, chat
template, instruction) is scaffolding that the pathway attends to and then drops, so the DiT
only ever sees the prompt.

`PreparedBranch`: one branch after the work that does not depend on the timestep (see
`TextPathway.prepare`). A sampler computes it once per run and batches it (e.g. cond + uncond for
CFG) with `PreparedBranch.cat`; its token counts are Python ints, so a step never syncs the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def pack_left(x: torch.Tensor, keep: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the kept tokens of each row to the front (order preserved) and cut to `n` tokens,
    the most that any row keeps."""
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :n]
    keep = torch.gather(keep, 1, order)
    x = torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[-1]))
    return x * keep[..., None].to(x.dtype), keep


def pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad dim 1 of a (B, L) or (B, L, D) tensor with zeros (False for masks)."""
    extra = length - x.shape[1]
    return F.pad(x, (0, 0, 0, extra) if x.dim() == 3 else (0, extra))


@dataclass
class TextStates:
    hidden: torch.Tensor  # (B, L, D)
    mask: torch.Tensor    # (B, L) bool
    prompt: torch.Tensor  # (B, L) bool, subset of mask

    @property
    def hidden_size(self) -> int:
        return self.hidden.shape[-1]

    def only_prompt(self) -> TextStates:
        """Crop the scaffolding right away (HunyuanVideo's order)."""
        hidden, keep = pack_left(self.hidden, self.prompt, int(self.prompt.sum(1).max()) if self.prompt.numel() else 0)
        return TextStates(hidden, keep, keep.clone())

    def to(self, device=None, dtype=None) -> TextStates:
        return TextStates(self.hidden.to(device=device, dtype=dtype), self.mask.to(device), self.prompt.to(device))

    def __getitem__(self, index) -> TextStates:
        return TextStates(self.hidden[index], self.mask[index], self.prompt[index])

    @staticmethod
    def cat(items: list[TextStates]) -> TextStates:
        """Batch prompts of different lengths by right-padding (e.g. cond + uncond for CFG)."""
        n = max(t.hidden.shape[1] for t in items)
        return TextStates(*(torch.cat([pad_tokens(getattr(t, f), n) for t in items])
                            for f in ("hidden", "mask", "prompt")))


@dataclass
class PreparedBranch:
    tokens: torch.Tensor              # (B, L, width): the projected states, the token refiner's input
    pooled: torch.Tensor              # (B, width): the projected masked mean of the states
    mask: torch.Tensor                # (B, L) bool
    prompt: torch.Tensor              # (B, L) bool
    real: tuple[int, ...]             # real tokens per row
    prompt_lengths: tuple[int, ...]   # prompt tokens per row

    @classmethod
    def of(cls, tokens: torch.Tensor, pooled: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor) -> PreparedBranch:
        """The one device sync of a sampling run: the token counts, read back once."""
        counts = torch.stack([mask.sum(1), prompt.sum(1)]).tolist()
        return cls(tokens, pooled, mask, prompt, tuple(counts[0]), tuple(counts[1]))

    def map(self, fn) -> PreparedBranch:
        """The same branch with `fn` applied to every tensor (moves, casts, indexing)."""
        return PreparedBranch(fn(self.tokens), fn(self.pooled), fn(self.mask), fn(self.prompt),
                              self.real, self.prompt_lengths)

    def repeat_to(self, batch: int) -> PreparedBranch:
        """Tile the rows to `batch` (a host's batch of several latents per prompt)."""
        reps = -(-batch // self.tokens.shape[0])
        rows = list(range(self.tokens.shape[0])) * reps
        return PreparedBranch(*(t.repeat(reps, *[1] * (t.dim() - 1))[:batch]
                                for t in (self.tokens, self.pooled, self.mask, self.prompt)),
                              tuple(self.real[i] for i in rows[:batch]),
                              tuple(self.prompt_lengths[i] for i in rows[:batch]))

    @staticmethod
    def cat(items: list[PreparedBranch]) -> PreparedBranch:
        """Batch rows of different lengths by right-padding, with the masks extended accordingly."""
        n = max(p.tokens.shape[1] for p in items)
        return PreparedBranch(torch.cat([pad_tokens(p.tokens, n) for p in items]),
                              torch.cat([p.pooled for p in items]),
                              torch.cat([pad_tokens(p.mask, n) for p in items]),
                              torch.cat([pad_tokens(p.prompt, n) for p in items]),
                              sum((p.real for p in items), ()), sum((p.prompt_lengths for p in items), ()))
