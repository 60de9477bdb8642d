"""Multi-process through the real ``deepspeed`` launcher on CPU (gloo): data and expert parallelism (and ZeRO-2
with overlapped, bucketed gradient reduction) track one rank, and a rank killed with SIGKILL resumes from the last
complete checkpoint, bit for bit."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pure_reasoner.train.export import differing_tensors
from pure_reasoner.train.metrics import read_curve
from tests.train.helpers import finish, launch, metrics, run_in_process, train_ranks


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, dist_info):
    """The reference: 1 rank, 2 micro-batches of 4 per step (the same global batch as 2 ranks x 4)."""
    run_dir = tmp_path_factory.mktemp("one_rank")
    run_in_process(run_dir, "train.micro_batch_size=4", "train.grad_accum=2")
    return metrics(run_dir)


EXPERT_PARALLEL = ("train.micro_batch_size=4", "train.ep_size=2")


@pytest.fixture(scope="module")
def expert_parallel(tmp_path_factory):
    """An uninterrupted run on 2 expert-parallel ranks: its directory and output."""
    run_dir = tmp_path_factory.mktemp("expert_parallel")
    return run_dir, finish(launch(run_dir, *EXPERT_PARALLEL))


# ZeRO-2 reduce-scattering its gradients in small buckets while the backward runs: many collectives per step.
OVERLAPPED = ("deepspeed=zero2", "deepspeed.overlap_comm=true", "deepspeed.reduce_bucket_size=20000")


# ZeRO-2 all-reducing whole buckets with the gradients rounded to bf16 on the wire (half the bytes).
BF16_WIRE = ("deepspeed=zero2", "deepspeed.reduce_scatter=false", "deepspeed.communication_data_type=bf16")


# No ZeRO: the gradients all-reduced once per step, every rank stepping the whole optimizer.
PLAIN_DP = ("deepspeed=zero0",)


@pytest.mark.parametrize("ep_size, zero", [(1, ()), (2, ()), (1, OVERLAPPED), (1, BF16_WIRE), (1, PLAIN_DP)],
                         ids=["dp", "ep", "zero2-overlap", "zero2-bf16-wire", "zero0"])
def test_two_ranks_track_one_rank(tmp_path, one_rank, expert_parallel, ep_size, zero):
    """bf16 on the wire rounds each rank's gradient to 8 mantissa bits before the sum; over these 12 steps that stays
    inside the same tolerance as a change of summation order (measured; a looser bound would hide more)."""
    if ep_size == 2:
        run_dir, out = expert_parallel
    else:
        run_dir, out = tmp_path, finish(launch(tmp_path, "train.micro_batch_size=4", *zero))
    assert out.count("done: 12 steps") == 2
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in one_rank]
    for row, ref in zip(rows, one_rank, strict=True):
        # Same sequences per micro-batch; only float summation order differs (all-reduce vs accumulation).
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-4)
        assert row["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-3)
        assert row["consult_rate_l1"] == pytest.approx(ref["consult_rate_l1"], abs=2e-3)
    if ep_size == 2:
        ckpt = run_dir / "checkpoints" / "step_00000012"
        assert len(list(ckpt.glob("layer_0_expert_*_model_states.pt"))) == 8  # one file per expert, from 2 ranks
        assert (run_dir / "export" / "model.safetensors").is_file()


def test_kill9_of_one_rank_then_same_command_resumes_exactly(tmp_path, expert_parallel):
    # Expert-parallel, so resuming also reloads DeepSpeed's per-expert checkpoint files on both ranks. The
    # decoupling recipe's features on 2 ranks: tests/reliability/test_soak_short.py.
    ref_dir, _ = expert_parallel
    proc = launch(tmp_path, *EXPERT_PARALLEL)
    latest = tmp_path / "checkpoints" / "latest"
    deadline = time.time() + 180
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert latest.exists() and proc.poll() is None, "the run ended before its first checkpoint"
    ranks = train_ranks(proc)
    assert len(ranks) == 2
    os.kill(ranks[1].pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-2000:]
    killed_at = latest.read_text()
    assert (tmp_path / "checkpoints" / killed_at / "trainer_state.json").is_file()

    out = finish(launch(tmp_path, *EXPERT_PARALLEL))
    assert out.count(f"resumed from {killed_at}") == 2
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    # Bit-identical: every step logged once, with the uninterrupted run's values, and the same final weights.
    assert read_curve(tmp_path) == read_curve(ref_dir)
    assert differing_tensors(tmp_path / "export", ref_dir / "export") == []
