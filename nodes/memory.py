"""Host memory between model loads.

Unloading a model frees its weights, but glibc keeps the freed heap pages for reuse, which the next
model's differently sized tensors fit badly. Handing the free pages back to the OS before each load
keeps a reloading server lower and steadier: 8 cycles of POST /free + the main workflow in fp32
read 2.65-2.72 GB with it, 2.74-2.82 GB without (measured here; in bf16 both stay flat).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once (find_library runs ldconfig), or None elsewhere."""
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def release_free_memory() -> None:
    """Collect garbage, then return the heap's free pages to the OS (glibc only; elsewhere a no-op)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
