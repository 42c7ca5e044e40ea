"""Keep freed host memory for reuse: a CPU training step stops paying page faults.

glibc's malloc serves every block above its mmap threshold (128 KiB, adapting up to 32 MiB) with
a fresh ``mmap`` and returns it to the kernel on ``free``. A training step allocates and frees
the same large activations, gradients (a text tower's dense embedding gradient alone is ~38 MB
for open_clip's vocabulary at width 192) and optimiser temporaries every step, so every step
page-faults them in again: measured 12-22k minor faults and 40-75 ms of kernel time per step on
the 2-core CPU bench model (ViT 4x192, batch 64), ~8 % of its CPU time. With mmap off and a high
trim threshold the heap keeps those pages: <1k faults and ~5 ms of kernel time a step. This is
what PyTorch's CPU performance guide gets from swapping in jemalloc or tcmalloc, without a
preloaded library.

The cost: memory freed by the process stays in its heap (up to the trim threshold at the top
of the heap, 1 GiB) rather than going back to the kernel, so the resident size tracks the peak.
``MMPRETRAIN_MALLOC=system`` leaves glibc's defaults. Not glibc (macOS, musl): nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Tune this process's glibc malloc as the module docstring says; True when it was applied.
    Forked data-loader workers inherit the setting."""
    if os.environ.get("MMPRETRAIN_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
