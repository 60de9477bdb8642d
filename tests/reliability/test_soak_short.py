"""The fault soak, short: 2 SIGKILLs of one of two expert-parallel ranks (one during a checkpoint write) of
a run with the decoupling recipe's features, the same command relaunched; nothing corrupt selected, every
relaunch resumes from the latest checkpoint, at most one interval lost per kill, the loss curve and final
weights bitwise unchanged. The long version is ``python scripts/soak.py --kills 10`` (docs/reliability.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


def test_short_soak(tmp_path):
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    result = soak.soak(tmp_path / "soak", kills=2, steps=12, ckpt_every=4, seed=0, max_delay=0.5, ranks=2,
                       experiment="decoupling_smoke")
    assert result["problems"] == []
    assert result["kills"] == 2 and result["kills_during_checkpoint_write"] == 1
    assert sum(result["kills_behind_compared_results"]) == 2 and result["results_compared"] >= 1
    assert result["launches_resumed_from_a_checkpoint"] >= 1  # the one after the kill inside a write at least
    assert result["max_steps_lost"] <= 4
