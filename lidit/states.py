"""What an LLM hands to the text pathway, and what the pathway keeps of it across sampling steps.

`TextStates`: an LLM's hidden states plus two masks. `mask` marks real tokens (False = padding).
`prompt` marks the user's own prompt tokens; every other real token (system prompt, chat
template, instruction) is scaffolding that the pathway attends to and then drops, so the DiT
only ever sees the prompt.

`PreparedBranch`: one branch after the work that does not depend on the timestep (see
`TextPathway.prepare`). A sampler computes it once per run and batches it (e.g. cond + uncond for
CFG) with `PreparedBranch.cat`. Its token counts are Python ints, so a step never syncs the device,
and they are kept per *kind* of row, not per row: a batch of any size made of the same prompts has
the same kinds, so a compiled forward (which specialises on Python values) is not traced again for
a new batch size.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

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


#: one kind of row of a batch: per branch, (real tokens, prompt tokens)
RowKind = tuple[tuple[int, int], ...]


@dataclass
class PreparedBranch:
    tokens: torch.Tensor          # (B, L, width): the projected states, the token refiner's input
    pooled: torch.Tensor          # (B, width): the projected masked mean of the states
    mask: torch.Tensor            # (B, L) bool
    prompt: torch.Tensor          # (B, L) bool
    kinds: tuple[RowKind, ...]    # the batch's distinct rows, over all its branches, sorted
    index: int = 0                # this branch's place in each kind

    @property
    def real(self) -> list[int]:
        """Real tokens of each kind of row of this branch."""
        return [kind[self.index][0] for kind in self._kinds()]

    @property
    def prompt_lengths(self) -> list[int]:
        """Prompt tokens of each kind of row of this branch."""
        return [kind[self.index][1] for kind in self._kinds()]

    def _kinds(self) -> tuple[RowKind, ...]:
        if not self.kinds:
            raise ValueError("this branch has not been joined with its batch's other branches (PreparedBranch.join)")
        return self.kinds

    @classmethod
    def of(cls, tokens: torch.Tensor, pooled: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor) -> PreparedBranch:
        """A branch on its own (the token counts read back: one device sync)."""
        return cls.join([cls(tokens, pooled, mask, prompt, ())])[0]

    @staticmethod
    def join(branches: list[PreparedBranch]) -> list[PreparedBranch]:
        """The branches of one batch, each told the kinds of row they make together: the one device
        sync of a sampling run, the token counts of every branch read back at once."""
        counts = torch.stack([m.sum(1) for b in branches for m in (b.mask, b.prompt)]).tolist()
        rows = zip(*(zip(counts[2 * i], counts[2 * i + 1]) for i in range(len(branches))))
        kinds = tuple(sorted(set(rows)))
        return [replace(b, kinds=kinds, index=i) for i, b in enumerate(branches)]

    def map(self, fn) -> PreparedBranch:
        """The same branch with `fn` applied to every tensor (moves, casts, indexing)."""
        return replace(self, tokens=fn(self.tokens), pooled=fn(self.pooled), mask=fn(self.mask), prompt=fn(self.prompt))

    def repeat_to(self, batch: int) -> PreparedBranch:
        """Tile the rows to `batch` (a host's batch of several latents per prompt). Its kinds stay:
        a cut that drops a kind leaves a superset, which is safe (see `KeyMask`)."""
        reps = -(-batch // self.tokens.shape[0])
        return self.map(lambda t: t.repeat(reps, *[1] * (t.dim() - 1))[:batch])

    @staticmethod
    def cat(items: list[PreparedBranch]) -> PreparedBranch:
        """Batch rows of different lengths by right-padding, with the masks extended accordingly."""
        n = max(p.tokens.shape[1] for p in items)
        return PreparedBranch(torch.cat([pad_tokens(p.tokens, n) for p in items]),
                              torch.cat([p.pooled for p in items]),
                              torch.cat([pad_tokens(p.mask, n) for p in items]),
                              torch.cat([pad_tokens(p.prompt, n) for p in items]),
                              tuple(sorted(set().union(*(p.kinds for p in items)))), items[0].index)
