"""Multi-process through the real ``deepspeed`` launcher on CPU (gloo): data and expert parallelism track
one rank, and a rank killed with SIGKILL resumes from the last complete checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.train.helpers import SMALL_RUN, metrics, run_in_process
from train.dist import _free_port

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def _launch(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """``deepspeed --no_local_rank --num_gpus 2 --module train ...``: the README's multi-process command."""
    cmd = [
        DEEPSPEED,
        "--no_local_rank",
        "--num_gpus",
        "2",
        "--master_port",
        str(_free_port()),
        "--module",
        "train",
        *SMALL_RUN,
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, dist_info):
    """The reference: 1 rank, 2 micro-batches of 4 per step (the same global batch as 2 ranks x 4)."""
    run_dir = tmp_path_factory.mktemp("one_rank")
    run_in_process(run_dir, "train.micro_batch_size=4", "train.grad_accum=2")
    return metrics(run_dir)


@pytest.mark.parametrize("ep_size", [1, 2])
def test_two_ranks_track_one_rank(tmp_path, one_rank, ep_size):
    out = _finish(_launch(tmp_path, "train.micro_batch_size=4", f"train.ep_size={ep_size}"))
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


def _runs_train(cmdline: list[str]) -> bool:
    return "-m" in cmdline and cmdline[cmdline.index("-m") + 1 :][:1] == ["train"]


def test_kill9_then_same_command_resumes(tmp_path):
    # Expert-parallel, so resuming also reloads DeepSpeed's per-expert checkpoint files on both ranks.
    args = (
        "train.max_steps=100",
        "train.warmup_steps=10",
        "train.ckpt_every=10",
        "train.log_every=10",
        "train.ep_size=2",
    )
    proc = _launch(tmp_path, *args)
    latest = tmp_path / "checkpoints" / "latest"
    deadline = time.time() + 180
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert latest.exists() and proc.poll() is None, "the run ended before its first checkpoint"
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if _runs_train(p.cmdline())]
    assert len(ranks) == 2
    os.kill(ranks[1].pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-2000:]
    killed_at = latest.read_text()
    assert (tmp_path / "checkpoints" / killed_at / "trainer_state.json").is_file()

    out = _finish(_launch(tmp_path, *args))
    assert f"resumed from {killed_at}" in out
    assert [r["step"] for r in metrics(tmp_path)] == [float(s) for s in range(1, 101)]  # each step once
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
