"""Nothing loaded from a run or export directory runs code; a full disk during a save loses nothing."""

from __future__ import annotations

import errno
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pure_reasoner.train import ds_checkpoint as checkpoint
from pure_reasoner.train.export import export_checkpoint
from pure_reasoner.train.protocol import RANK_VARIABLES
from tests.train.helpers import run_in_process

SHORT = ("train.max_steps=2", "train.warmup_steps=1", "train.ckpt_every=2", "train.export=false")


class Boom:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_no_unsafe_loader_in_the_code():
    """The repo itself never calls a code-executing loader (tests aside)."""
    root = Path(__file__).resolve().parents[2]
    pattern = r"weights_only=False[,)]|pickle\.loads?\(|yaml\.load\(|yaml\.unsafe_load|[^.a-z_]eval\(|[^.a-z_]exec\("
    found = subprocess.run(
        ["grep", "-rEn", pattern, "--include=*.py", "moe", "train", "kernels", "benchmarks", "scripts"],
        cwd=root,
        capture_output=True,
        text=True,
    ).stdout
    assert found == "", found


def _evil(path: Path, marker: Path) -> Path:
    torch.save({"module": Boom(marker), "w": torch.ones(2)}, path)  # a real torch zip file carrying a call
    return path


def test_the_payload_runs_without_the_guard(tmp_path):
    """The malicious file is live: an unguarded load does create the marker (so the tests below can fail)."""
    marker = tmp_path / "pwned"
    torch.load(_evil(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def test_safe_torch_load_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = _evil(tmp_path / "evil.pt", marker)
    with checkpoint.safe_torch_load(), pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(evil, weights_only=False)  # what DeepSpeed passes; the context overrides it
    assert not marker.exists()
    ok = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2)}, ok)
    with checkpoint.safe_torch_load():
        assert torch.equal(torch.load(ok, weights_only=False)["w"], torch.ones(2))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, dist_info) -> Path:
    run_dir = tmp_path_factory.mktemp("short")
    run_in_process(run_dir, *SHORT)
    return run_dir


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_resume_and_export_refuse_a_pickle_with_code(short_run, tmp_path, victim, dist_info):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(short_run, run_dir)
    marker = tmp_path / "pwned"
    _evil(run_dir / "checkpoints" / "step_00000002" / victim, marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        run_in_process(run_dir, *SHORT[1:], "train.max_steps=4")  # resumes from step 2
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        export_checkpoint(run_dir, out_dir=tmp_path / "export")
    assert not marker.exists()
    assert not (tmp_path / "export").exists()


def test_full_disk_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, dist_info):
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if "step_00000004" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(
        OSError, match=r"could not write checkpoint step_00000004 .*No space left.*latest stays step_00000002"
    ):
        run_in_process(tmp_path, "train.max_steps=4", "train.warmup_steps=1", "train.ckpt_every=2")
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in root.glob("*step_*")) == ["step_00000002"]  # the partial .tmp- copy is gone
    monkeypatch.setattr(torch, "save", real)
    resumed = run_in_process(tmp_path, "train.max_steps=4", "train.warmup_steps=1", "train.ckpt_every=2")
    assert resumed.resumed_from == "step_00000002" and len(resumed.losses) == 2


def test_cli_full_disk_exits_nonzero(tmp_path):
    """The same through ``python -m pure_reasoner.train``: exit status 4 and the message, via a sitecustomize patch."""
    (tmp_path / "sitecustomize.py").write_text(
        "import errno, torch\n"
        "real = torch.save\n"
        "def save(obj, f, *a, **k):\n"
        "    if 'step_00000004' in str(f):\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device', str(f))\n"
        "    return real(obj, f, *a, **k)\n"
        "torch.save = save\n"
    )
    import os

    root = Path(__file__).resolve().parents[2]
    # Not the in-process tests' one-rank group: RANK/MASTER_PORT set by init_distributed must not leak in.
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env |= {"PYTHONPATH": f"{tmp_path}{os.pathsep}{root}"}
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pure_reasoner.train",
            "experiment=smoke",
            "data.max_chars=60000",
            "train.max_steps=4",
            "train.warmup_steps=1",
            "train.ckpt_every=2",
            "train.progress=false",
            "train.threads=1",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=root,
    )
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "No space left on device" in proc.stderr and "latest stays step_00000002" in proc.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
