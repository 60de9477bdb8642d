"""A rank whose peer hangs (alive, silent) fails after train.collective_timeout_s instead of waiting forever,
and exits with the code it chose (train.dist.exit_rank; a plain sys.exit there aborted once in CI while
tearing down the process group: SIGABRT, "terminate called without an active exception")."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pure_reasoner.train.dist import _free_port
from pure_reasoner.train.protocol import RANK_VARIABLES

ROOT = Path(__file__).resolve().parents[2]
RANK = """
import time, torch
from pure_reasoner.train.dist import init_distributed, all_reduce_sum, exit_rank
info = init_distributed(timeout_s=5.0)
if info.rank == 1:
    time.sleep(120)  # hung: holds its sockets open, never joins the collective
t0 = time.monotonic()
try:
    all_reduce_sum(torch.ones(1))
except Exception as err:
    print(f"collective failed after {time.monotonic() - t0:.1f} s: {type(err).__name__}", flush=True)
    exit_rank(5)
"""


def test_survivor_exits_after_the_timeout():
    port = str(_free_port())
    base = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    base |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK],
            env=base
            | {
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    try:
        start = time.monotonic()
        out, _ = procs[0].communicate(timeout=90)
        assert procs[0].returncode == 5, out[-2000:]
        assert "collective failed after" in out
        waited = float(out.split("collective failed after ")[1].split(" s")[0])
        assert 4.0 <= waited <= 30.0, out[-2000:]
        assert time.monotonic() - start < 90
    finally:
        procs[1].kill()
        procs[1].wait()
