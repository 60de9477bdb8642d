"""Process-group setup for one or many ranks, and the few collectives the loop needs.

Launched by ``deepspeed`` (or torchrun) the environment carries RANK / WORLD_SIZE / MASTER_*; run as a
plain ``python -m pure_reasoner.train`` it does not, and this fills in a one-rank group on a free local port.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import deepspeed
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Join (or create) the default process group: gloo on CPU, NCCL on CUDA. Idempotent.

    timeout_s bounds every collective: a rank whose peer hangs (not dies: a dead peer's socket closes
    at once) fails after this long with an error instead of waiting forever.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    if not cuda:
        # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce op with g++ for every process group
        # (1-2 minutes on 2 cores, and again whenever another build invalidates the shared cache). Only
        # its inference all-reduce uses it; marking it unavailable leaves every collective to gloo.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if cuda else "gloo", verbose=False, timeout=timedelta(seconds=timeout_s)
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # torchrun exports LOCAL_WORLD_SIZE; DeepSpeed's launcher exports LOCAL_SIZE (single node: the world).
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return DistInfo(rank, world, local_rank, local_world, device)


def set_threads(info: DistInfo, threads: int | None) -> int:
    """Give each rank its share of the cores. Two ranks with 2 threads each on 2 cores run ~10x slower."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    count = threads or max(1, cores // info.local_world_size)
    torch.set_num_threads(count)
    return count


def barrier() -> None:
    if multi_rank():
        dist.barrier()


def _all_ok(ok: bool) -> bool:
    """Whether every rank says ok (a MIN all-reduce)."""
    if not multi_rank():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@contextlib.contextmanager
def rank_zero_first(rank: int):
    """Rank 0 runs the block first (filling caches, writing files), then the others.

    If rank 0 fails the others do not wait forever: they raise too.
    """
    if rank != 0:
        if not _all_ok(True):
            raise RuntimeError("rank 0 failed while preparing the run (its error is above)")
        yield
        return
    try:
        yield
    except BaseException:
        _all_ok(False)
        raise
    _all_ok(True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks, in place, returned for chaining."""
    if multi_rank():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def multi_rank() -> bool:
    """Whether this process belongs to an initialised process group of more than one rank."""
    return dist.is_initialized() and dist.get_world_size() > 1


def exit_rank(code: int) -> NoReturn:
    """End this process with ``code``; a rank of a multi-rank group skips the interpreter's teardown.

    After a failed collective (a hung or dead peer) the process group cannot be torn down cleanly: gloo's
    threads may still be inside it, and destroying it at interpreter exit can abort the process ("terminate
    called without an active exception", SIGABRT) instead of exiting with ``code``. So such a rank flushes its
    output and leaves with ``os._exit``. One rank (or no group): a plain ``sys.exit``.
    """
    if not multi_rank():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
