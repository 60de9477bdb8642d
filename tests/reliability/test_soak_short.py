"""The fault soak, short: 3 SIGKILLs of ``python -m train`` (one during a checkpoint write), same command
relaunched; nothing corrupt selected, at most one interval lost per kill, the loss curve bitwise unchanged.
The long version is ``python scripts/soak.py --kills 20``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


def test_short_soak(tmp_path):
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    result = soak.soak(tmp_path / "soak", kills=3, steps=16, ckpt_every=4, seed=0, max_delay=0.5)
    assert result["problems"] == []
    assert result["kills"] == 3 and result["kills_during_checkpoint_write"] == 1
    assert sum(result["kills_behind_compared_curves"]) == 3
    assert result["max_steps_lost"] <= 4 and result["curves_match"]
