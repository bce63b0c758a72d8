"""Which dtype to compute in, on the device at hand: one switch for sampling, evaluation and training.

bf16 where the hardware multiplies it natively: CUDA GPUs with bf16, and CPUs with AVX512-BF16 or
AMX. On such a CPU bf16 matmuls ran 4.5x faster than fp32 (812 vs 179 GFLOP/s on 2 threads, torch
2.14). Never fp16 on a CPU (2 GFLOP/s there), and fp32 everywhere else.
"""
from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def native_bf16(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def compute_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if native_bf16(device) else torch.float32


DTYPE_CHOICES = ("auto", "bf16", "fp32")


def parse_dtype(choice: str, device: torch.device | str = "cpu") -> torch.dtype:
    """A command line's --dtype: auto = `compute_dtype(device)`."""
    return compute_dtype(device) if choice == "auto" else {"bf16": torch.bfloat16, "fp32": torch.float32}[choice]
