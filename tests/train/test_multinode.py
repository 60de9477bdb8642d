"""docs/multinode.md's command on one machine: two "nodes" from a hostfile, started one per node with the
DeepSpeed launcher's ``--no_ssh --node_rank`` (what each machine runs), expert parallelism across them.

The oracle is one eager rank reading the same micro-batches (grad_accum=2); tolerance as in
test_train_launcher (all-reduce vs accumulation order)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pure_reasoner.train.dist import _free_port
from tests.train.helpers import DEEPSPEED, finish, metrics, run_in_process

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("train.max_steps=6", "train.micro_batch_size=4", "train.ckpt_every=3")


def node_command(hostfile, node_rank: int, port: int, run_dir, *overrides: str) -> list[str]:
    """The per-node command of docs/multinode.md."""
    return [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "--no_local_rank",
            "--module", "pure_reasoner.train", "experiment=smoke", "data.max_chars=60000", "train.progress=false",
            "train.threads=1", f"hydra.run.dir={run_dir}", *overrides]


def test_two_nodes_expert_parallel_track_one_rank(tmp_path, dist_info):
    ref_dir = tmp_path / "one_rank"
    run_in_process(ref_dir, *STEPS, "train.grad_accum=2", "train.export=false")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # names only: --no_ssh never resolves them
    port, run_dir = _free_port(), tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    nodes = [subprocess.Popen(node_command(hostfile, rank, port, run_dir, *STEPS, "train.ep_size=2"), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outs = [finish(node, timeout=300) for node in nodes]
    assert all(out.count("done: 6 steps") == 1 for out in outs), outs[1][-2000:]
    assert "rank 1/2" in (run_dir / "train_rank1.log").read_text()
    for row, ref in zip(metrics(run_dir), metrics(ref_dir), strict=True):
        assert row["step"] == ref["step"]
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-4)
    ckpt = run_dir / "checkpoints" / "step_00000006"
    assert len(list(ckpt.glob("layer_0_expert_*_model_states.pt"))) == 8  # experts of both nodes, one directory
    assert (run_dir / "export" / "model.safetensors").is_file()
