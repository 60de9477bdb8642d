"""``results/runs.json``: every run names its recipe, seeds and commit, and they agree with what it ran.

The seed is checked against the training command (``train.seed=k``; absent: the default 0), the world seed
against the world its eval report was scored on (``world.seed``), and the scorecard must group the recorded eval
reports by the manifest without two runs claiming the same recipe and seed.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from pure_reasoner.train.evaluation import scorecard

RESULTS = Path(__file__).resolve().parents[2] / "results"
MANIFEST = json.loads((RESULTS / "runs.json").read_text())
COMMIT = re.compile(r"^[0-9a-f]{40}(-dirty)?$")
TRAINERS = ("train", "pure_reasoner.train")


def _train_seed(commands: list[str]) -> int | None:
    """``train.seed`` of the entry's training command (0 when not overridden); None without a training command."""
    for command in commands:
        argv = shlex.split(command.split("#")[0])
        if argv[:2] == ["python", "-m"] and len(argv) > 2 and argv[2] in TRAINERS:
            seeds = [int(a.split("=", 1)[1]) for a in argv[3:] if a.lstrip("+").startswith("train.seed=")]
            return seeds[-1] if seeds else 0
    return None


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_entry_names_recipe_seeds_and_commit(name):
    entry = MANIFEST[name]
    assert isinstance(entry["recipe"], str) and entry["recipe"], entry
    assert isinstance(entry["seed"], int) and isinstance(entry["world_seed"], int), entry
    assert isinstance(entry["heldout"], bool), entry
    assert COMMIT.match(entry["commit"]), entry["commit"]
    train_seed = _train_seed(entry["commands"])
    if train_seed is not None:
        assert entry["seed"] == train_seed, (entry["seed"], entry["commands"])
    report = RESULTS / "eval" / f"{name}.json"
    if report.is_file():
        assert entry["world_seed"] == json.loads(report.read_text())["world"]["seed"]


def test_scorecard_groups_the_recorded_reports_by_the_manifest():
    reports = sorted(str(p) for p in (RESULTS / "eval").glob("*.json"))
    runs = scorecard.read_runs(reports, MANIFEST)  # raises on two runs with one recipe and seed
    for run in runs:
        entry = MANIFEST.get(Path(run.path).stem)
        if entry is not None and "run" not in run.report:
            assert (run.recipe, run.seed, run.heldout) == (entry["recipe"], entry["seed"], entry["heldout"])


def test_train_seed_reads_the_command():
    """The oracle above can fail: it reads the seed a command sets, and 0 when it sets none."""
    assert _train_seed(["source x", "python -m train experiment=decoupling train.seed=3"]) == 3
    assert _train_seed(["python -m pure_reasoner.train ++train.seed=2 name=a"]) == 2
    assert _train_seed(["python -m train experiment=decoupling"]) == 0
    assert _train_seed(["python -m pure_reasoner.train.update runs/x"]) is None
