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
