"""Tiny random LLMs, built offline and saved as HF folders, loaded back through lidit's loader."""
from __future__ import annotations

import pytest
import torch

from tests.fixtures_models import build_tiny_llm

# The models here are tiny: extra threads only add overhead, and oversubscribe a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llm_dirs(tmp_path_factory) -> dict[str, str]:
    """{'tiny-llama': dir, 'tiny-qwen2': dir}: hidden 64 / 48, 4 layers each."""
    root = tmp_path_factory.mktemp("llms")
    return {name: str(build_tiny_llm(root / name, arch, hidden, chat))
            for name, arch, hidden, chat in (("tiny-llama", "llama", 64, False), ("tiny-qwen2", "qwen2", 48, True))}


@pytest.fixture(scope="session")
def tiny_llms(tiny_llm_dirs):
    from lidit.llm import load_llm
    return [load_llm(tiny_llm_dirs["tiny-llama"]), load_llm(tiny_llm_dirs["tiny-qwen2"])]
