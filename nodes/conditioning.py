"""The packed LI-DiT CONDITIONING: every LLM branch of one prompt in one standard entry.

    [[tensor (B, L1 + L2 + ..., max D_k), {MASK: (B, L) bool, PROMPT: (B, L) bool, LAYOUT: ((D_1, L_1), ...),
                                          FINGERPRINT: (sum, sum of squares) of the tensor}]]

Branches are concatenated along the sequence in refiner order and zero-padded to the widest
hidden size, so stock nodes (KSampler, CFGGuider, ...) carry it like any other conditioning.
MASK marks real tokens, PROMPT the user's own prompt tokens (the rest is instruction and
template scaffolding), LAYOUT each branch's hidden size and length, to cut the tensor apart.

Stock nodes that rewrite a conditioning's tensor but keep its extras (ConditioningAverage blends
token by token and cuts or pads to the other's length; ConditioningConcat appends) would mix the
branches silently: FINGERPRINT tells that the tensor is no longer the one Fusion packed, and the
model refuses it with an error that says what to use instead. An all-zero tensor
(ConditioningZeroOut) is the one change that has a meaning: no text.

The tensor holds the LLMs' raw states in float32. The model turns them into `PreparedBranch`es
once per sampling run (in `extra_conds`, before the host casts anything to the model's dtype,
which raw states would overflow in float16) and carries those in a `CONDText`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import comfy.conds

from ..lidit.states import PreparedBranch, TextStates

MASK = "lidit_mask"
PROMPT = "lidit_prompt"
LAYOUT = "lidit_layout"
FINGERPRINT = "lidit_fingerprint"
CHANGED = ("a node between LI-DiT Collaborative Fusion and the sampler changed the LI-DiT conditioning's tensor "
           "({what}). Stock nodes such as ConditioningAverage and ConditioningConcat blend or join tensors position by "
           "position, which mixes LI-DiT's LLM branches into a wrong image. To mix two LI-DiT prompts use "
           "ConditioningCombine, which keeps each prompt whole, or write the mix into one prompt.")

Layout = tuple[tuple[int, int], ...]


def pack(texts: list[TextStates]) -> tuple[torch.Tensor, dict]:
    width = max(t.hidden_size for t in texts)
    tensor = torch.cat([F.pad(t.hidden, (0, width - t.hidden_size)) for t in texts], dim=1)
    extras = {
        MASK: torch.cat([t.mask for t in texts], dim=1),
        PROMPT: torch.cat([t.prompt for t in texts], dim=1),
        LAYOUT: tuple((t.hidden_size, t.hidden.shape[1]) for t in texts),
        FINGERPRINT: fingerprint(tensor),
    }
    return tensor, extras


def fingerprint(tensor: torch.Tensor) -> tuple[float, float]:
    x = tensor.double()
    return x.sum().item(), x.square().sum().item()


def unpack(context: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor, layout: Layout,
           packed: tuple[float, float] | None = None) -> list[TextStates]:
    """The branches back, in refiner order, once the tensor is known to be the one packed (its
    `packed` fingerprint). Masks may arrive as 0/1 numbers (hosts cast them)."""
    lengths = [length for _, length in layout]
    if context.shape[1] != sum(lengths) or mask.shape[-1] != sum(lengths):
        raise ValueError(CHANGED.format(what=f"it has {context.shape[1]} tokens, its layout describes {sum(lengths)}"))
    if packed is not None and fingerprint(context) != tuple(packed) and context.any():
        raise ValueError(CHANGED.format(what="its values are not the ones Collaborative Fusion packed"))
    out = []
    for (hidden, _), h, m, p in zip(layout, context.split(lengths, 1), mask.split(lengths, -1), prompt.split(lengths, -1)):
        out.append(TextStates(h[..., :hidden], m.bool(), p.bool()))
    return out


class CONDText(comfy.conds.CONDRegular):
    """One prompt's prepared branches (a tuple, which the host passes through uncast).

    It batches with prompts of other lengths, padding every branch and extending its masks, so a
    prompt and its negative run in one forward (CONDRegular concatenates only equal shapes).
    """

    def process_cond(self, batch_size: int, **kwargs) -> CONDText:
        return self._copy_with(tuple(b.repeat_to(batch_size) for b in self.cond))

    def can_concat(self, other: CONDText) -> bool:
        return len(self.cond) == len(other.cond) and self.cond[0].tokens.device == other.cond[0].tokens.device

    def concat(self, others: list[CONDText]) -> tuple[PreparedBranch, ...]:
        rows = [self.cond, *(o.cond for o in others)]
        return tuple(PreparedBranch.cat([r[k] for r in rows]) for k in range(len(self.cond)))

    def size(self) -> list[int]:
        """(batch, tokens, width), for the host's memory estimate."""
        return [self.cond[0].tokens.shape[0], sum(b.tokens.shape[1] for b in self.cond), self.cond[0].tokens.shape[2]]
