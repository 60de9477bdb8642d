"""The table a run on the knowledge world ends with (train.first_look): the same figures as the evaluation's report
on the same questions, and printed by ``python -m pure_reasoner.train``."""

import json
import subprocess
import sys
from pathlib import Path

from pure_reasoner.train.evaluation.evaluate import main as eval_main
from pure_reasoner.train.first_look import first_look, render
from tests.train.helpers import RECIPE_RUN, run_in_process

REPO = Path(__file__).resolve().parents[2]


def test_first_look_matches_train_eval_and_shows_every_cell(tmp_path):
    run_in_process(tmp_path / "run", "train.max_steps=6", base=RECIPE_RUN)
    export = tmp_path / "run" / "export"
    report = first_look(export, max_examples=12)
    assert eval_main(["--checkpoint", str(export), "--splits", "closed_book,open_book", "--ablations",
                      "base,knowledge_off", "--max-examples", "12", "--bits-people", "0", "--generate", "none",
                      "--json", str(tmp_path / "eval.json")]) == 0
    full = json.loads((tmp_path / "eval.json").read_text())
    text = render(report)
    for split in ("closed_book", "open_book"):
        for ablation in ("base", "knowledge_off"):
            ours, theirs = report["splits"][split][ablation], full["splits"][split][ablation]
            assert ours["n"] == theirs["n"] == 12
            assert ours["acc"] == theirs["acc"]
            assert f"{ours['acc']:.2f} [" in text and f"({ours['acc_adjusted']:+.2f})" in text
    assert "knowledge off" in text.splitlines()[0]


def test_first_look_is_skipped_without_a_world(tmp_path):
    assert first_look(tmp_path, max_examples=12) is None


def test_the_main_job_ends_with_the_table(tmp_path):
    cmd = [sys.executable, "-m", "pure_reasoner.train", *RECIPE_RUN, "train.max_steps=5", "train.first_look=8",
           f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    tail = done.stdout[done.stdout.index("done:"):]
    assert "closed book (recall)" in tail and "open book (read)" in tail and "knowledge off" in tail
