"""Instruction insertion (paper §3.1): system prompt, instruction and chat template around a prompt.

The template is tokenised in pieces (before the prompt, the prompt, after it) rather than as one
string, so the span of the user's prompt is exact for every tokenizer, and the scaffolding before
it is the same token sequence for every prompt.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .config import PAPER_INSTRUCTION, TextConfig

INSTRUCTION_PRESETS = {"paper": PAPER_INSTRUCTION, "none": ""}
_SLOT = "\x00PROMPT\x00"

#: chat templates that ComfyUI's bundled tokenizer lacks: it loads Qwen3-4B with Qwen2.5's tokenizer files,
#: whose template adds a default system turn that Qwen3's own does not (Z-Image's template is this one).
#: Keyed by ComfyUI's encoder name; shared by the CLIP node and the trainer's text-encoder files.
CHAT_TEMPLATES = {"qwen3_4b": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"}


class WithChatTemplate:
    """An HF tokenizer with the model's own chat template, leaving the shared tokenizer untouched."""

    def __init__(self, tokenizer, chat_template: str) -> None:
        self.tokenizer, self.chat_template = tokenizer, chat_template

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def apply_chat_template(self, messages: list[dict], **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)


@dataclass(frozen=True)
class PromptTemplate:
    instruction: str = PAPER_INSTRUCTION
    system_prompt: str = ""
    chat_template: bool = True

    @classmethod
    def of(cls, text: TextConfig) -> PromptTemplate:
        """The scaffolding a checkpoint was trained with."""
        return cls(text.instruction, text.system_prompt, text.chat_template)


def resolve_instruction(preset: str, custom: str = "") -> str:
    """'paper', 'none' or 'custom' (then `custom` is the instruction)."""
    if preset == "custom":
        return custom.strip()
    if preset not in INSTRUCTION_PRESETS:
        raise ValueError(f"unknown instruction preset {preset!r}; use one of {[*INSTRUCTION_PRESETS, 'custom']}")
    return INSTRUCTION_PRESETS[preset]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _chat(tokenizer, template: PromptTemplate, lead: str) -> str:
    user = {"role": "user", "content": lead + _SLOT}
    if template.system_prompt:
        try:
            return tokenizer.apply_chat_template(
                [{"role": "system", "content": template.system_prompt}, user], tokenize=False, add_generation_prompt=True)
        except Exception:  # some templates reject a system turn: fold it into the user turn
            user = {"role": "user", "content": f"{template.system_prompt}\n\n{lead}{_SLOT}"}
    return tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)


def template_ids(tokenizer, template: PromptTemplate) -> tuple[list[int], list[int]]:
    """Token ids that go before and after the user's prompt."""
    lead = f"{template.instruction}\n" if template.instruction else ""
    if template.chat_template and getattr(tokenizer, "chat_template", None):
        before, after = _chat(tokenizer, template, lead).split(_SLOT)
        return _ids(tokenizer, before), _ids(tokenizer, after)
    head = f"{template.system_prompt}\n\n{lead}" if template.system_prompt else lead
    plain = tokenizer("x", add_special_tokens=True)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and plain[0] == tokenizer.bos_token_id else []
    eos_id = getattr(tokenizer, "eos_token_id", None)  # (ComfyUI's sentencepiece tokenizers have none)
    eos = [eos_id] if eos_id is not None and len(plain) > 1 and plain[-1] == eos_id else []  # T5's </s>: LLMs add none
    return bos + _ids(tokenizer, head), eos


@dataclass
class TokenizedPrompts:
    input_ids: torch.Tensor  # (B, L), right-padded
    mask: torch.Tensor       # (B, L) bool, real tokens
    prompt: torch.Tensor     # (B, L) bool, the user's prompt tokens


def tokenize_prompts(tokenizer, prompts: list[str], template: PromptTemplate, max_tokens: int) -> TokenizedPrompts:
    """Scaffolding + prompt per row; prompts longer than `max_tokens` are cut with a warning."""
    before, after = template_ids(tokenizer, template)
    rows, spans = [], []
    for text in prompts:
        ids = _ids(tokenizer, text)
        if len(ids) > max_tokens:
            warnings.warn(f"prompt has {len(ids)} tokens, truncated to max_tokens={max_tokens} "
                          f"(dropped the last {len(ids) - max_tokens}): {text[:60]!r}...", stacklevel=2)
            ids = ids[:max_tokens]
        rows.append(before + ids + after)
        spans.append((len(before), len(before) + len(ids)))
    length = max(1, *(len(r) for r in rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    prompt = torch.zeros_like(mask)
    for i, (row, (start, end)) in enumerate(zip(rows, spans)):
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = True
        prompt[i, start:end] = True
    return TokenizedPrompts(input_ids, mask, prompt)
