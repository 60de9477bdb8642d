"""The protocol end to end on a tiny world (3 seeds, 2 training steps each), and its refusals."""

import json
from types import SimpleNamespace

import pytest
import yaml

from pure_reasoner.train import chain, protocol
from pure_reasoner.train.evaluation import scorecard
from pure_reasoner.train.protocol import chain_stages, check_world, compose, main, plan, train_chain

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
        assert entry["commands"][2] == (f"python -m pure_reasoner.train.evaluation.stream_rate runs/tiny-seed{seed} "
                                        f"--report results/eval/tiny_seed{seed}.json")
        stream = report["routing"]["train_stream"]  # measured after the last of the 2 steps
        assert stream["steps"] == [2, 33] and 0.0 <= stream["rate"] <= 1.0  # the default 32 micro-batches
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


LEAD = "relocate_keys_cf_release_copy_release_both_anchored_consulting"
# The lead recipe's chain, read off its configs' train.init_from and objective.teacher by hand: each stage after the
# stages whose exports it names.
LEAD_CHAIN = ["recall_keys_docmask", "relocate_keys_cf", "relocate_keys_cf_release",
              "relocate_keys_cf_release_read_wide", "relocate_keys_cf_release_read_wide_release",
              "relocate_keys_cf_release_copy",
              "relocate_keys_cf_release_copy_read", "relocate_keys_cf_release_copy_release"]


def test_chain_lists_the_earlier_recipes_in_training_order():
    (run, *_) = plan(LEAD, [4, 0, 1], [4], 0, [f"experiment={LEAD}", "train.progress=false", "train.first_look=0",
                                               "objective.read_weight=2.0"])
    stages = chain_stages(run, 600)
    assert [s.recipe for s in stages] == LEAD_CHAIN
    for stage in stages:  # same seed and world; run-only overrides passed on, the recipe's loss weights not
        assert (stage.seed, stage.world_seed, stage.heldout) == (4, 4, True)
        assert stage.overrides == (f"experiment={stage.recipe}", "train.progress=false", "train.first_look=0")
    assert chain_stages(plan("r", [0, 1, 2], [], 0, list(TINY))[0], 60) == []  # nothing to start from


def test_chain_refuses_loops_and_mixed_seeds(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text("")

    def cfg(name, init_from=None, teacher=None):
        return SimpleNamespace(name=name, train=SimpleNamespace(init_from=init_from),
                               objective=SimpleNamespace(teacher=teacher))

    configs = {"a": cfg("a", "runs/b-seed3/export"), "b": cfg("b", teacher="runs/a-seed3/export")}
    with pytest.raises(ValueError, match="loops: top -> a -> b -> a"):
        chain.stages(cfg("top", "runs/a-seed3/export"), 3, configs.__getitem__, tmp_path)
    with pytest.raises(ValueError, match="runs/a-seed1/export: a stage of another seed than 3"):
        chain.needed(cfg("top", "runs/a-seed1/export"), 3, tmp_path)
    # paths outside the pattern, or of recipes with no config, are models to load, not stages to train
    assert chain.needed(cfg("top", "runs/c-seed3/export", "/data/teacher"), 3, tmp_path) == []


def test_train_chain_trains_only_missing_stages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trained = []

    def fake_run(command):
        name = next(a.split("=", 1)[1] for a in command if a.startswith("name="))
        (tmp_path / "runs" / name / "export").mkdir(parents=True)
        trained.append(name)
        return 1.0

    monkeypatch.setattr(protocol, "_run", fake_run)
    (run, *_) = plan(LEAD, [0, 1, 2], [], 0, [f"experiment={LEAD}"])
    stages = chain_stages(run, 600)
    (tmp_path / "runs" / "recall_keys_docmask-seed0" / "export").mkdir(parents=True)
    entry = train_chain(stages, 600)
    assert trained == [f"{s}-seed0" for s in LEAD_CHAIN[1:]]
    assert entry["chain_reused"] == ["recall_keys_docmask-seed0"]
    assert list(entry["chain_train_wall_s"]) == LEAD_CHAIN[1:]
    assert entry["chain_commands"][0].startswith("python -m pure_reasoner.train experiment=relocate_keys_cf name=")
    assert train_chain(stages, 600)["chain_commands"] == []  # all there now


def test_a_missing_earlier_stage_says_how_to_train_it(tmp_path):
    from pure_reasoner.train.distill import load_teacher
    from pure_reasoner.train.init_from import check_source

    cfg = compose(["experiment=relocate_keys_cf", "train.seed=7"])
    with pytest.raises(ValueError, match=r"train.init_from=runs/recall_keys_docmask-seed7/export is not a directory: "
                                         r"it is recipe 'recall_keys_docmask'.s model of seed 7; .*"
                                         r"experiment=recall_keys_docmask train.seed=7.*--chain"):
        check_source(cfg.train.init_from, cfg.model, 1)
    with pytest.raises(ValueError, match=r"objective.teacher=runs/recall_keys_docmask-seed7/export is not a directory: "
                                         r"it is recipe 'recall_keys_docmask'"):
        load_teacher(cfg, tmp_path, 0)
    assert not list(tmp_path.iterdir())  # nothing written
    assert chain.missing_export("train.init_from", "/data/x") == "train.init_from=/data/x is not a directory"


def test_main_with_chain_trains_the_earlier_stage_of_each_seed_first(tmp_path, monkeypatch):
    """``--chain`` in an empty directory: each seed's earlier stage (decoupling_smoke, 30 steps) is trained on that
    seed's world, then the recipe starts from it (decoupling_smoke_next, 10 steps), then the eval; all recorded."""
    monkeypatch.chdir(tmp_path)
    recipe, stage = "decoupling_smoke_next", "decoupling_smoke"
    assert main(["--recipe", recipe, "--seeds", "0", "1", "2", "--world-seed-offset", "20", "--eval-examples", "6",
                 "--eval-arg=--bits-people=0", "--eval-arg=--generate=none", "--eval-arg=--splits=closed_book",
                 "--chain", "--", f"experiment={recipe}", "train.progress=false", "train.threads=1",
                 "train.max_steps=4", "train.warmup_steps=1"]) == 0
    runs = json.loads((tmp_path / "results" / "runs.json").read_text())
    for seed in (0, 1, 2):
        entry = runs[f"{recipe}_seed{seed}"]
        (command,) = entry["chain_commands"]
        assert command.startswith(f"python -m pure_reasoner.train experiment={stage} train.progress=false "
                                  f"train.threads=1 name={stage}-seed{seed} train.seed={seed} ")
        assert "max_steps" not in command  # the recipe's override is not the earlier stage's
        assert f"++data.generator_kwargs.seed={20 + seed}" in command
        assert list(entry["chain_train_wall_s"]) == [stage] and entry["chain_reused"] == []
        first = yaml.safe_load((tmp_path / "runs" / f"{stage}-seed{seed}" / "config.yaml").read_text())
        assert first["data"]["generator_kwargs"]["seed"] == 20 + seed and first["train"]["max_steps"] == 30
        second = yaml.safe_load((tmp_path / "runs" / f"{recipe}-seed{seed}" / "config.yaml").read_text())
        assert second["train"]["init_from"] == f"runs/{stage}-seed{seed}/export"
        assert second["train"]["max_steps"] == 4


def test_a_probe_runs_fewer_seeds_on_choosing_worlds_only():
    (run,) = plan("r", [6], [], 0, [], probe=True)
    assert (run.seed, run.world_seed, run.heldout, run.probe) == (6, 6, False, True)
    with pytest.raises(ValueError, match="--probe for fewer"):
        plan("r", [6], [], 0, [])
    with pytest.raises(ValueError, match="--probe asks .* held out \\[6\\]"):
        plan("r", [6], [6], 0, [], probe=True)
    with pytest.raises(ValueError, match="--probe asks .* seeds \\[0, 1, 2\\]"):
        plan("r", [0, 1, 2], [], 0, [], probe=True)
    with pytest.raises(ValueError, match="distinct and at least one"):
        plan("r", [], [], 0, [], probe=True)


def test_chain_only_then_a_probe_on_the_trained_chain(tmp_path, monkeypatch):
    """``--chain-only`` trains the earlier stage and records it without running the recipe; a ``--probe`` of the
    recipe on that seed then reuses it, and its entry and report say probe."""
    monkeypatch.chdir(tmp_path)
    recipe, stage = "decoupling_smoke_next", "decoupling_smoke"
    common = ["--recipe", recipe, "--seeds", "4", "--world-seed-offset", "20", "--eval-examples", "6", "--probe"]
    overrides = ["--", f"experiment={recipe}", "train.progress=false", "train.threads=1", "train.max_steps=4",
                 "train.warmup_steps=1"]
    assert main([*common, "--chain-only", *overrides]) == 0
    runs = json.loads((tmp_path / "results" / "runs.json").read_text())
    assert list(runs) == [f"{recipe}_seed4_chain"] and not (tmp_path / "runs" / f"{recipe}-seed4").exists()
    entry = runs[f"{recipe}_seed4_chain"]
    assert list(entry["chain_train_wall_s"]) == [stage] and (entry["seed"], entry["world_seed"]) == (4, 24)
    assert (tmp_path / "runs" / f"{stage}-seed4" / "export").is_dir()
    assert main([*common, "--chain", "--eval-arg=--bits-people=0", "--eval-arg=--generate=none",
                 "--eval-arg=--splits=closed_book", *overrides]) == 0
    entry = json.loads((tmp_path / "results" / "runs.json").read_text())[f"{recipe}_seed4"]
    assert entry["chain_reused"] == [f"{stage}-seed4"] and entry["chain_commands"] == [] and entry["probe"] is True
    report = json.loads((tmp_path / "results" / "eval" / f"{recipe}_seed4.json").read_text())
    assert report["run"] == {"recipe": recipe, "seed": 4, "world_seed": 24, "heldout": False, "probe": True}
