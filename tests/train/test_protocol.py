"""The protocol end to end on a tiny world (3 seeds, 2 training steps each), and its refusals."""

import json

import pytest
import yaml

from pure_reasoner.train.evaluation import scorecard
from pure_reasoner.train.protocol import check_world, compose, main, plan

TINY = ("experiment=decoupling_tiny", "model=tiny", "model.max_seq_len=384", "train.max_steps=2",
        "train.warmup_steps=1", "train.ckpt_every=2", "train.log_every=1", "train.progress=false",
        "train.threads=1", "data.generator_kwargs.num_people=24", "data.generator_kwargs.num_unseen=12")


def test_protocol_runs_three_seeds_on_their_own_worlds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--recipe", "tiny", "--seeds", "0", "1", "2", "--heldout-seeds", "2", "--world-seed-offset", "10",
                 "--eval-examples", "6", "--eval-arg=--bits-people=0", "--eval-arg=--generate=none",
                 "--eval-arg=--splits=closed_book,open_book,counterfactual", "--", *TINY]) == 0
    runs = json.loads((tmp_path / "results" / "runs.json").read_text())
    assert sorted(runs) == ["tiny_seed0", "tiny_seed1", "tiny_seed2"]
    for seed in (0, 1, 2):
        entry = runs[f"tiny_seed{seed}"]
        assert (entry["seed"], entry["world_seed"], entry["heldout"]) == (seed, 10 + seed, seed == 2)
        assert len(entry["commit"]) >= 40 and entry["train_wall_s"] > 0
        assert f"train.seed={seed}" in entry["commands"][0]
        assert "python -m pure_reasoner.train.evaluation" in entry["commands"][1]
        config = yaml.safe_load((tmp_path / "runs" / f"tiny-seed{seed}" / "config.yaml").read_text())
        assert config["train"]["seed"] == seed and config["data"]["generator_kwargs"]["seed"] == 10 + seed
        report = json.loads((tmp_path / "results" / "eval" / f"tiny_seed{seed}.json").read_text())
        assert report["world"]["seed"] == 10 + seed  # the model was evaluated on its own world
        assert report["run"] == {"recipe": "tiny", "seed": seed, "world_seed": 10 + seed, "heldout": seed == 2}
        assert report["splits"]["closed_book"]["base"]["n"] == 6
    worlds = [json.loads((tmp_path / "results" / "eval" / f"tiny_seed{s}.json").read_text())["world"]
               for s in (0, 1)]
    assert worlds[0] != worlds[1]
    files = sorted(str(p) for p in (tmp_path / "results" / "eval").glob("*.json"))
    (card,) = scorecard.score(scorecard.read_runs(files), scorecard.load_targets(scorecard.DEFAULT_TARGETS))
    assert (card["recipe"], card["seeds"], card["heldout_seeds"]) == ("tiny", [0, 1, 2], [2])


def test_protocol_refuses_what_cannot_tell_recipes_apart(tmp_path, capsys):
    with pytest.raises(ValueError, match=">= 3 distinct seeds"):
        plan("r", [0, 1], [], 0, [])
    with pytest.raises(ValueError, match="not among --seeds"):
        plan("r", [0, 1, 2], [5], 0, [])
    with pytest.raises(ValueError, match="sets .*train.seed=3"):
        plan("r", [0, 1, 2], [], 0, ["train.seed=3"])
    (run, *_) = plan("r", [0, 1, 2], [], 0, list(TINY))
    cfg = compose(run.train_overrides(600))
    # 12 held-out people x 5 attributes = 60 closed-book questions, not 600
    with pytest.raises(ValueError, match=r"single-hop splits \{'closed_book': 60\} hold fewer than"):
        check_world(cfg, 600)
    assert check_world(cfg, 60) == {"closed_book": 60, "open_book": 600}
    assert main(["--recipe", "r", "--results", str(tmp_path), "--", *TINY]) == 2
    assert "fewer than --eval-examples=600" in capsys.readouterr().err
    with pytest.raises(ValueError, match="data.generator=pure_reasoner.train.world.generator:pretraining_corpus"):
        check_world(compose(["experiment=smoke", "data=shakespeare"]), 10)
