"""LI-DiT Linguistic Token Refiner and Collaborative Fusion: the text pathway made visible.

The refiners are timestep-conditioned, so they cannot run here: they run inside the MODEL at
every sampling step. These nodes fix the routing instead (which LLM feeds which refiner),
check it against the checkpoint, and pack the branches into one standard CONDITIONING.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..lidit.config import LIDiTConfig
from ..lidit.instruction import PromptTemplate
from . import conditioning
from .encode import EncodedText
from .host_model import lidit_config_of

MAX_BRANCHES = 4


@dataclass(eq=False)
class RoutedText:
    """The LIDIT_BRANCH value: encoded text tagged with the refiner that will refine it (None: by slot)."""

    text: EncodedText
    refiner: int | None


class LIDiTTokenRefiner:
    DESCRIPTION = ("The paper's linguistic token refiner for one LLM branch (§3.1). It is conditioned on the "
                   "timestep, so the LI-DiT model runs it at every sampling step; this node picks which of the "
                   "checkpoint's refiners refines this LLM's tokens.")
    CATEGORY = "LI-DiT"
    FUNCTION = "route"
    RETURN_TYPES = ("LIDIT_BRANCH",)
    RETURN_NAMES = ("branch",)
    OUTPUT_TOOLTIPS = ("The text routed to a refiner, for LI-DiT Collaborative Fusion.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text": ("LIDIT_TEXT", {"tooltip": "From an LI-DiT Instructed Encode."}),
            "refiner_index": ("INT", {"default": -1, "min": -1, "max": 63,
                                      "tooltip": "Which of the checkpoint's refiners (0, 1, ...) refines this text. "
                                                 "-1: the one of the fusion input it is connected to "
                                                 "(branch_1 -> 0, branch_2 -> 1, ...)."}),
        }}

    def route(self, text: EncodedText, refiner_index: int) -> tuple[RoutedText]:
        return (RoutedText(text, None if refiner_index < 0 else refiner_index),)


def describe_expected(config: LIDiTConfig) -> str:
    return ", ".join(f"{b.name} (hidden {b.hidden_size})" for b in config.text.branches)


def route_branches(config: LIDiTConfig, slots: list[RoutedText | None]) -> list[EncodedText]:
    """The connected branches in the checkpoint's refiner order; a clear error if they cannot fit."""
    expected = config.text.branches
    got = [(i, b) for i, b in enumerate(slots) if b is not None]
    plural = "es" if len(expected) > 1 else ""
    summary = ", ".join(f"branch_{i + 1} = {b.text.identity.describe()}" for i, b in got)
    if len(got) != len(expected):
        raise ValueError(f"this checkpoint expects {len(expected)} LLM branch{plural}: {describe_expected(config)}; "
                         f"got {len(got)}: {summary}. Connect one LI-DiT Linguistic Token Refiner per LLM, "
                         "in this order.")
    by_refiner: dict[int, int] = {}
    for i, b in got:
        k = i if b.refiner is None else b.refiner
        if k >= len(expected):
            raise ValueError(f"branch_{i + 1} asks for refiner {k}, but this checkpoint has refiners 0..{len(expected) - 1} "
                             f"({describe_expected(config)}); set refiner_index to -1 or a valid index")
        if k in by_refiner:
            raise ValueError(f"branch_{by_refiner[k] + 1} and branch_{i + 1} both go to refiner {k}; "
                             "give each branch its own refiner_index (or -1 to follow the fusion order)")
        by_refiner[k] = i
    ordered = [slots[by_refiner[k]].text for k in range(len(expected))]
    for k, (want, text) in enumerate(zip(expected, ordered)):
        got_id = text.identity
        if got_id.hidden_size != want.hidden_size:
            raise ValueError(f"refiner {k} was trained on {want.name} (hidden {want.hidden_size}) but gets "
                             f"{got_id.describe()} from branch_{by_refiner[k] + 1}. This checkpoint expects: "
                             f"{describe_expected(config)}; load {want.name} for that branch.")
        if got_id.llm_name != want.name:
            logging.warning("LI-DiT: refiner %d was trained on %s, gets %s (same hidden size; results may suffer)",
                            k, want.name, got_id.llm_name)
        if got_id.layer != want.layer:
            logging.warning("LI-DiT: refiner %d was trained on hidden layer %d of %s, gets layer %d",
                            k, want.layer, want.name, got_id.layer)
    trained = PromptTemplate.of(config.text)
    for text in ordered:
        tokens = int(text.states.prompt.sum())
        if tokens > config.text.max_tokens:
            logging.warning("LI-DiT: the %s prompt has %d tokens, the checkpoint was trained on at most %d",
                            text.identity.llm_name, tokens, config.text.max_tokens)
        differs = [f for f in ("instruction", "system_prompt", "chat_template")
                   if getattr(text.identity.template, f) != getattr(trained, f)]
        if differs:
            logging.warning("LI-DiT: the %s text was encoded with another %s than the checkpoint was trained with",
                            text.identity.llm_name, " and ".join(differs))
    return ordered


class LIDiTCollaborativeFusion:
    DESCRIPTION = ("The paper's collaborative refiner stage (§3.1): gathers the LLM branches of one prompt in the "
                   "checkpoint's order, checks them against it and packs them into one CONDITIONING, which stock "
                   "nodes pass through. The LI-DiT model refines and fuses them at every sampling step.")
    CATEGORY = "LI-DiT"
    FUNCTION = "fuse"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("All branches of one prompt, for a sampler's positive or negative input.",)

    @classmethod
    def INPUT_TYPES(cls):
        branch = "An LI-DiT Linguistic Token Refiner output (one per LLM the checkpoint was trained with)."
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The LI-DiT model; its checkpoint says which LLM branches it needs."}),
                "branch_1": ("LIDIT_BRANCH", {"tooltip": branch}),
            },
            "optional": {f"branch_{i}": ("LIDIT_BRANCH", {"tooltip": branch}) for i in range(2, MAX_BRANCHES + 1)},
        }

    def fuse(self, model, branch_1: RoutedText, **more: RoutedText) -> tuple[list]:
        slots = [branch_1, *(more.get(f"branch_{i}") for i in range(2, MAX_BRANCHES + 1))]
        texts = route_branches(lidit_config_of(model), slots)
        tensor, extras = conditioning.pack([t.states for t in texts])
        return ([[tensor, extras]],)
