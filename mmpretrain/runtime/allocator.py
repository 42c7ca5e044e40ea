"""Keep freed host memory for reuse, so a CPU training step does not page-fault its buffers in again.

glibc's malloc serves every block above its mmap threshold with a fresh ``mmap`` and returns it to
the kernel on ``free``; a training step allocates and frees the same large activations, gradients
and optimiser temporaries every step. With mmap off and a high trim threshold the heap keeps those
pages (what PyTorch's CPU performance guide gets from jemalloc or tcmalloc, without a preloaded
library; the measurement is in benchmarks/NOTES.md).

The cost: memory freed by the process stays in its heap (up to the trim threshold at the top of
the heap, 1 GiB), so the resident size tracks the peak. ``MMPRETRAIN_MALLOC=system`` leaves glibc's
defaults. Not glibc (macOS, musl): nothing to do.
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
