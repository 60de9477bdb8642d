"""Packaging promises: importing moe (and kernels) never imports triton; the demo runs."""

import subprocess
import sys

from pure_reasoner.moe.demo import main as demo_main


def test_import_does_not_load_triton():
    code = "import sys, moe, kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_demo_runs(capsys):
    demo_main(["--preset", "tiny", "--steps", "5", "--batch", "2"])
    out = capsys.readouterr().out
    assert "realized" in out and "MoE layer 1" in out
