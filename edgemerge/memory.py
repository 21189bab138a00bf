"""Process memory settings for streaming work.

glibc gives every freed block above its mmap threshold (128 KiB, rising to at most 32 MiB) back to the
kernel, so a loop that allocates a fresh float32 block per step page-faults all of it in again each time (the
README's performance section has the measurement). Raising the
threshold to its maximum and the trim threshold above the merge's working set keeps those blocks in the heap
for reuse while the merge runs; glibc's defaults come back afterwards (llama.cpp runs in the same process).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Iterator

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024**2  # glibc's largest accepted value on 64-bit systems
TRIM_THRESHOLD = 512 * 1024**2
_GLIBC_DEFAULT = 128 * 1024  # both thresholds' initial values (mallopt(3))


@functools.cache
def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - musl and other libcs lack them
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def freed_blocks_kept() -> Iterator[bool]:
    """Keep freed blocks up to 32 MiB in the heap inside the block, then restore glibc's defaults and give the
    heap's free memory back. Yields whether the setting applied (glibc only; elsewhere there is nothing to do)."""
    libc = _glibc()
    applied = bool(
        libc is not None
        and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    try:
        yield applied
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
            libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)
            libc.malloc_trim(0)
