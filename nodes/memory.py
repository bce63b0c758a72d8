"""Host memory between model loads.

Unloading a model frees its weights, but glibc keeps the freed heap pages for reuse, which the next
model's differently sized tensors fit badly. Handing the free pages back to the OS before each load
keeps a reloading server lower and steadier: 8 cycles of POST /free + the main workflow in fp32
read 2.65-2.72 GB with it, 2.74-2.82 GB without (measured here; in bf16 both stay flat).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys


def release_free_memory() -> None:
    """Collect garbage, then return the heap's free pages to the OS (glibc only; elsewhere a no-op)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        libc = ctypes.util.find_library("c")
        if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):
            ctypes.CDLL(libc).malloc_trim(0)
