"""Multi-process through the real ``deepspeed`` launcher on CPU (gloo): data and expert parallelism track
one rank, and a rank killed with SIGKILL resumes from the last complete checkpoint, bit for bit."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.train.helpers import RECIPE_RUN, finish, launch, metrics, run_in_process, train_ranks
from train.export import differing_tensors
from train.metrics import read_curve


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, dist_info):
    """The reference: 1 rank, 2 micro-batches of 4 per step (the same global batch as 2 ranks x 4)."""
    run_dir = tmp_path_factory.mktemp("one_rank")
    run_in_process(run_dir, "train.micro_batch_size=4", "train.grad_accum=2")
    return metrics(run_dir)


@pytest.mark.parametrize("ep_size", [1, 2])
def test_two_ranks_track_one_rank(tmp_path, one_rank, ep_size):
    out = finish(launch(tmp_path, "train.micro_batch_size=4", f"train.ep_size={ep_size}"))
    assert out.count("done: 12 steps") == 2
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [r["step"] for r in one_rank]
    for row, ref in zip(rows, one_rank, strict=True):
        # Same sequences per micro-batch; only float summation order differs (all-reduce vs accumulation).
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-4)
        assert row["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-3)
        assert row["consult_rate_l1"] == pytest.approx(ref["consult_rate_l1"], abs=2e-3)
    if ep_size == 2:
        ckpt = tmp_path / "checkpoints" / "step_00000012"
        assert len(list(ckpt.glob("layer_0_expert_*_model_states.pt"))) == 8  # one file per expert, from 2 ranks
        assert (tmp_path / "export" / "model.safetensors").is_file()


def test_kill9_of_one_rank_then_same_command_resumes_exactly(tmp_path):
    # Expert-parallel, so resuming also reloads DeepSpeed's per-expert checkpoint files on both ranks; the
    # decoupling recipe's features, with the recall_mean forget pass (router and experts run in it too).
    args = ("objective.forget_ablation=recall_mean", "train.ep_size=2", "train.micro_batch_size=4")
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    finish(launch(ref_dir, *args, base=RECIPE_RUN))
    proc = launch(run_dir, *args, base=RECIPE_RUN)
    latest = run_dir / "checkpoints" / "latest"
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
    assert (run_dir / "checkpoints" / killed_at / "trainer_state.json").is_file()

    out = finish(launch(run_dir, *args, base=RECIPE_RUN))
    assert out.count(f"resumed from {killed_at}") == 2
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    # Bit-identical: every step logged once, with the uninterrupted run's values, and the same final weights.
    assert read_curve(run_dir) == read_curve(ref_dir)
    assert differing_tensors(run_dir / "export", ref_dir / "export") == []
