"""The packed LI-DiT CONDITIONING: every LLM branch of one prompt in one standard entry.

    [[tensor (B, L1 + L2 + ..., max D_k), {MASK: (B, L) bool, PROMPT: (B, L) bool, LAYOUT: ((D_1, L_1), ...)}]]

Branches are concatenated along the sequence in refiner order and zero-padded to the widest
hidden size, so stock nodes (KSampler, CFGGuider, ...) carry it like any other conditioning.
MASK marks real tokens, PROMPT the user's own prompt tokens (the rest is instruction and
template scaffolding), LAYOUT each branch's hidden size and length, to cut the tensor apart.

The tensor holds the LLMs' raw states in float32. The model turns them into `PreparedBranch`es
once per sampling run (in `extra_conds`, before the host casts anything to the model's dtype,
which raw states would overflow in float16) and carries those in a `CONDText`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import comfy.conds

from ..lidit.text import PreparedBranch, TextStates

MASK = "lidit_mask"
PROMPT = "lidit_prompt"
LAYOUT = "lidit_layout"

Layout = tuple[tuple[int, int], ...]


def pack(texts: list[TextStates]) -> tuple[torch.Tensor, dict]:
    width = max(t.hidden_size for t in texts)
    tensor = torch.cat([F.pad(t.hidden, (0, width - t.hidden_size)) for t in texts], dim=1)
    extras = {
        MASK: torch.cat([t.mask for t in texts], dim=1),
        PROMPT: torch.cat([t.prompt for t in texts], dim=1),
        LAYOUT: tuple((t.hidden_size, t.hidden.shape[1]) for t in texts),
    }
    return tensor, extras


def unpack(context: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor, layout: Layout) -> list[TextStates]:
    """The branches back, in refiner order. Masks may arrive as 0/1 numbers (hosts cast them)."""
    lengths = [length for _, length in layout]
    if context.shape[1] != sum(lengths) or mask.shape[-1] != sum(lengths):
        raise ValueError(
            f"the LI-DiT conditioning has {context.shape[1]} tokens but its layout describes {sum(lengths)} "
            f"({'+'.join(map(str, lengths))}): a node between Collaborative Fusion and the sampler changed the "
            "tensor (e.g. ConditioningConcat), which LI-DiT conditioning does not support")
    out = []
    for (hidden, _), h, m, p in zip(layout, context.split(lengths, 1), mask.split(lengths, -1), prompt.split(lengths, -1)):
        out.append(TextStates(h[..., :hidden], m.bool(), p.bool()))
    return out


class CONDText(comfy.conds.CONDRegular):
    """One prompt's prepared branches (a tuple, which the host passes through uncast).

    It batches with prompts of other lengths, padding every branch and extending its masks, so a
    prompt and its negative run in one forward (CONDRegular concatenates only equal shapes).
    """

    def process_cond(self, batch_size: int, **kwargs) -> "CONDText":
        return self._copy_with(tuple(b.repeat_to(batch_size) for b in self.cond))

    def can_concat(self, other: "CONDText") -> bool:
        return len(self.cond) == len(other.cond) and self.cond[0].tokens.device == other.cond[0].tokens.device

    def concat(self, others: list["CONDText"]) -> tuple[PreparedBranch, ...]:
        rows = [self.cond, *(o.cond for o in others)]
        return tuple(PreparedBranch.cat([r[k] for r in rows]) for k in range(len(self.cond)))

    def size(self) -> list[int]:
        """(batch, tokens, width), for the host's memory estimate."""
        return [self.cond[0].tokens.shape[0], sum(b.tokens.shape[1] for b in self.cond), self.cond[0].tokens.shape[2]]
