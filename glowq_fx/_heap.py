"""Handing freed heap memory back to the operating system.

Block by block, every block allocates and frees the same few hundred MB (its weights, its ``S``,
the solver's temporaries). glibc's allocator keeps freed chunks in its arenas for reuse, but
fragmentation lets the process's resident memory grow by most of a block per block (measured: a
12-layer model's anonymous memory went 0.9 to 2.0 GB from disk; with a trim after each block it
stays at 0.4 GB plus the output shard being filled). ``malloc_trim`` returns the free pages now;
it changes no allocator setting, so nothing outside this call behaves differently.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only: musl and others do not have it
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def trim_heap(freed_bytes: int | None = None) -> bool:
    """Return the C heap's free pages to the OS; False where the C library cannot (not glibc), or
    where the caller freed less than ``TRIM_MIN_BYTES`` (``freed_bytes``, an estimate): a trim
    walks the whole heap, which costs more than a few small groups' temporaries are worth."""
    if freed_bytes is not None and freed_bytes < TRIM_MIN_BYTES:
        return False
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


TRIM_MIN_BYTES = 4 << 20


def release_cycles() -> None:
    """Free what a graph capture left (Dynamo's shape environments, fake tensors and graphs: reference
    cycles that reach the real weights they were traced from, which only a full collection frees and
    which the generational collector may leave for many blocks), then hand the freed heap back. The
    second pass takes what the first one's finalizers released. A full collection walks every Python
    object (0.2-1 s): callers use it where the cycles hold more than that is worth."""
    import gc

    for _ in range(2):
        if not gc.collect():
            break
    trim_heap()
