"""The entry points' malloc tuning: when it re-executes, and that the re-executed process keeps big frees."""

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pure_reasoner.kernels import malloc_tuning as mt

ROOT = Path(__file__).resolve().parents[2]


def test_tunes_a_plain_glibc_process():
    env = mt.tuned_environment({"PATH": "/bin"}, "glibc")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": mt.TUNABLES, mt.ENV_MARKER: "1"}


@pytest.mark.parametrize("env, libc", [
    ({mt.ENV_SWITCH: "0"}, "glibc"),  # opted out
    ({mt.ENV_MARKER: "1"}, "glibc"),  # already the re-executed process: never loop
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "glibc"),  # the user's own tunables win
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "glibc"),  # scripts/cpu_env.sh's route
    ({}, "musl"),  # tunables are glibc's
    ({}, ""),  # unknown C library (macOS, Windows)
], ids=["opt-out", "marker", "user-tunables", "jemalloc", "musl", "unknown-libc"])
def test_leaves_the_process_alone(env, libc):
    assert mt.tuned_environment(env, libc) is None


# Re-executes itself through the real entry-point helper, then reports what glibc did with a 200 MiB block:
# untuned glibc serves it from an mmap (unmapped again on free); tuned, from the heap, which keeps it.
_CHILD = textwrap.dedent("""
    import ctypes, os, sys
    from pure_reasoner.kernels.malloc_tuning import reexec_with_malloc_tunables
    print("start", os.getpid(), flush=True)
    reexec_with_malloc_tunables()
    libc = ctypes.CDLL("libc.so.6")
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    block = libc.malloc(200 << 20)
    info = libc.mallinfo2()
    libc.free(ctypes.c_void_p(block))
    heap = libc.mallinfo2().arena  # after the free: what the heap kept (top_pad, trim_threshold)
    print("tunables", os.environ.get("GLIBC_TUNABLES"), "args", sys.argv[1:], "heap", heap >> 20,
          "mmapped", info.hblkhd >> 20)
""")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc tunables only")
@pytest.mark.parametrize("opt_out", [False, True], ids=["tuned", "opted-out"])
def test_reexec_keeps_big_blocks_on_the_heap(opt_out):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", mt.ENV_MARKER, "LD_PRELOAD")}
    env |= {"PYTHONPATH": str(ROOT), mt.ENV_SWITCH: "0" if opt_out else "1"}
    out = subprocess.run([sys.executable, "-c", _CHILD, "a", "b=c"], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.splitlines()
    starts = [line for line in out if line.startswith("start")]
    result = out[-1].split()
    assert result[result.index("args") + 1:result.index("heap")] == ["['a',", "'b=c']"]  # same arguments
    if opt_out:
        assert len(starts) == 1 and result[1] == "None" and int(result[-1]) >= 200 and int(result[-3]) < 200
    else:
        # Started twice in the same process (execve keeps the PID); the block came from the heap.
        assert len(starts) == 2 and len({s.split()[1] for s in starts}) == 1
        assert result[1] == mt.TUNABLES and int(result[-1]) == 0 and int(result[-3]) >= 1024  # + 1 GiB top pad


def test_regime_names_the_allocator_in_force():
    assert mt.regime({}) == "glibc"
    assert mt.regime({"GLIBC_TUNABLES": mt.TUNABLES}) == "glibc tuned"
    assert mt.regime({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "GLIBC_TUNABLES": "x"}) == "jemalloc"
