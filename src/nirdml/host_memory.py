"""Keep freed host memory in the process, so that work repeated on the CPU (a training step, a
batch of embeddings) does not page-fault its buffers in again each time.

glibc's malloc serves large requests with fresh ``mmap`` regions (above a threshold it adapts
up to 32 MiB) and hands the free top of its heap back to the kernel (above a trim threshold).
A training step on the CPU allocates and frees the same tens of megabytes every step, so
depending on the order of those requests the kernel zero-fills them again each step: on the
small CNN at batch 90 (``benchmarks/bench_train_step.py``), 6,500-17,000 minor page faults a
step, which made the step 77-103 ms instead of 69 ms.
:func:`keep_freed_memory` fixes both thresholds high (``mallopt``), so freed buffers are reused:
the process keeps up to its peak heap (plus :data:`TRIM_THRESHOLD`) instead of returning it
(a 1-epoch Omniglot NIR run: peak RSS 1.71 GB instead of 1.38 GB, 24 s instead of 32 s).
The trainer calls it on the CPU (``train.keep_host_memory``); the one-off commands do not (for
``nirdml evaluate`` of an Omniglot checkpoint it saves 5 of 15 s but raises peak RSS from 1.28
to 1.97 GB); a library user calls it where it suits them.

Written here rather than taken from a library: PyTorch's CPU tuning guide suggests preloading
jemalloc or tcmalloc, which a ``pip install`` cannot do; this is one libc call, a no-op off
glibc.
"""

from __future__ import annotations

import ctypes
import platform

#: ``mallopt`` parameters (glibc's ``malloc.h``)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: requests up to this size come from the heap (reused once freed), not from fresh mmaps
MMAP_THRESHOLD = 256 << 20
#: free memory at the heap's top that is kept rather than returned to the kernel
TRIM_THRESHOLD = 1 << 30

_applied = False


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (process-wide; idempotent). Returns whether they
    are in force (False off Linux/glibc, where nothing is changed)."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
