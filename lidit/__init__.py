"""LI-DiT in pure PyTorch: instructed LLM encoding, token and collaborative refiners, the DiT.

Importable without ComfyUI; the node pack at the repository root is a thin adapter over it.
"""
from .checkpoint import load_checkpoint, read_config, save_checkpoint
from .config import PAPER_INSTRUCTION, DiTConfig, LIDiTConfig, LLMBranch, TextConfig, preset, with_branches
from .diffusion import sample, training_loss
from .instruction import PromptTemplate
from .model import LIDiTModel, parameter_counts
from .states import TextStates

__all__ = [
    "PAPER_INSTRUCTION", "DiTConfig", "LIDiTConfig", "LIDiTModel", "LLMBranch", "PromptTemplate", "TextConfig",
    "TextStates", "load_checkpoint", "parameter_counts", "preset", "read_config", "sample", "save_checkpoint",
    "training_loss", "with_branches",
]
