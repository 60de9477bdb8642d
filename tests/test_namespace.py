"""Our packages live under one namespace, ``pure_reasoner``: a top-level ``kernels``, ``train``, ``moe`` or
``benchmarks`` of another distribution (Hugging Face's ``kernels`` is one) cannot shadow them."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
import torch

from pure_reasoner.moe import PureReasonerLM, preset
from pure_reasoner.train.evaluation.evaluate import ABLATIONS  # noqa: F401  the training stack imports too
from pure_reasoner.train.loop import run  # noqa: F401

assert not {"kernels", "train", "moe", "benchmarks"} & set(sys.modules), "a top-level name was imported"
model = PureReasonerLM(preset("tiny"))
idx_BS = torch.randint(0, model.cfg.vocab_size, (2, 16))
out = model(idx_BS, targets_BS=idx_BS)
out.loss.backward()
assert torch.isfinite(out.loss)

import kernels, moe, train  # the other distribution's packages, side by side with ours
assert kernels.OTHER and train.OTHER and moe.OTHER
print("ok")
"""


def test_other_top_level_packages_do_not_shadow_ours(tmp_path):
    for name in ("kernels", "train", "moe", "benchmarks"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("OTHER = True  # not pure-reasoner's\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


SCRIPT_FROM_ROOT = """
import sys
import torch

import kernels, train, benchmarks  # found first as our folders (the repository root leads sys.path)
assert kernels.OTHER and train.OTHER and benchmarks.OTHER, "our folder shadowed another distribution's package"
import moe  # no other distribution provides `moe`: the bare name stays ours
assert hasattr(moe, "PureReasonerLM") and not hasattr(moe, "OTHER")

from pure_reasoner.kernels import knowledge_mlp  # noqa: F401  ours, under our namespace, unaffected
from pure_reasoner.moe import PureReasonerLM, preset
assert sys.modules["pure_reasoner.kernels"] is not kernels
model = PureReasonerLM(preset("tiny"))
idx_BS = torch.randint(0, model.cfg.vocab_size, (2, 16))
assert torch.isfinite(model(idx_BS, targets_BS=idx_BS).loss)
print("ok")
"""


def test_our_folders_do_not_shadow_other_top_level_packages_from_the_repository_root(tmp_path):
    """`python -m ...` from the repository root puts that root first on sys.path, so a library's `import
    kernels` (transformers imports Hugging Face's) meets our `kernels/` folder first; it must get the installed
    package instead."""
    for name in ("kernels", "train", "benchmarks"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("OTHER = True  # not pure-reasoner's\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT_FROM_ROOT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
