"""glibc malloc set to keep freed memory and back it with huge pages: the entry points' CPU speed-up.

PyTorch's CPU allocator is glibc malloc: every step frees its activations and gradients, glibc returns
the top of the heap (and every block above its mmap threshold) to the kernel, and the next step faults
them back in page by page. jemalloc with no decay and THP removes that cost (``scripts/cpu_env.sh``),
but it is not installed everywhere. glibc itself can do most of it through its tunables: a huge trim
threshold and top pad keep freed heap memory, a 4 GiB mmap threshold puts big tensors on that heap too
(not on mmaps that every free unmaps), ``hugetlb=1`` madvises it for transparent huge pages (kernels
with THP in ``madvise`` mode use none otherwise). Measured on the default ``python -m pure_reasoner.train`` (see
benchmarks/RESULTS.md).

Tunables are read once, when the process starts, so the entry points (``python -m pure_reasoner.train``, the
benchmarks) call ``reexec_with_malloc_tunables()`` first thing: it re-executes the same command once
with ``GLIBC_TUNABLES`` set (same PID, so launchers that watch it are unaffected). It does nothing when
``PURE_REASONER_MALLOC_TUNING=0``, when GLIBC_TUNABLES or an LD_PRELOADed jemalloc/tcmalloc is already
in force (the user's choice wins), off glibc Linux, or when this process is the re-executed one.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

ENV_SWITCH = "PURE_REASONER_MALLOC_TUNING"  # "0" turns the re-exec off
ENV_MARKER = "PURE_REASONER_MALLOC_TUNED"  # set in the re-executed process: never loop
TUNABLES = ":".join((
    "glibc.malloc.mmap_threshold=4294967296",
    "glibc.malloc.trim_threshold=17179869184",
    "glibc.malloc.top_pad=1073741824",
    "glibc.malloc.hugetlb=1",
))
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def tuned_environment(env: Mapping[str, str], libc: str) -> dict[str, str] | None:
    """The environment to re-execute with, or None when this process should run as it is.

    Args:
        env: the current environment.
        libc: the C library's name (``platform.libc_ver()[0]``): tunables are glibc's.
    """
    if env.get(ENV_SWITCH, "1").strip() == "0" or env.get(ENV_MARKER) or libc != "glibc":
        return None
    if "GLIBC_TUNABLES" in env or any(name in env.get("LD_PRELOAD", "") for name in _OTHER_ALLOCATORS):
        return None
    return {**env, "GLIBC_TUNABLES": TUNABLES, ENV_MARKER: "1"}


def regime(env: Mapping[str, str]) -> str:
    """The allocator this process runs with, in a word or two: a preloaded allocator's name, else ``glibc`` (with
    ``tuned`` when GLIBC_TUNABLES is set). What a GEMM timing depends on when every call allocates its output."""
    preload = env.get("LD_PRELOAD", "")
    for name in _OTHER_ALLOCATORS:
        if name in preload:
            return name
    return "glibc tuned" if env.get("GLIBC_TUNABLES") else "glibc"


def reexec_with_malloc_tunables() -> None:
    """Re-execute this command once with ``TUNABLES`` in GLIBC_TUNABLES (see the module docstring).

    Call it before any work is done: the process is replaced (nothing after the call runs in this one).
    """
    if not sys.platform.startswith("linux"):
        return
    env = tuned_environment(os.environ, platform.libc_ver()[0])
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
