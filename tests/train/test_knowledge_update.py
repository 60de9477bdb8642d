"""A knowledge update end to end (python -m pure_reasoner.train.update's run and train.update_eval): on the
decoupling recipe's
smoke run, under ZeRO-1 and ZeRO-2, only the knowledge experts' and routers' parameters change; with replay, the
run trains on the update's rows plus as many replayed ones and records the replay, and can anchor only those."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pure_reasoner.moe import PureReasonerLM
from pure_reasoner.train.export import load_run_config
from pure_reasoner.train.update import main as update_main
from pure_reasoner.train.update import run_config
from pure_reasoner.train.update_eval import main as update_eval_main
from pure_reasoner.train.world.generator import build_world, load_world_config
from pure_reasoner.train.world_update import UPDATE_FILE, UpdateConfig, build_update, update_rows
from tests.train.helpers import RECIPE_RUN, run_in_process

UPDATE = UpdateConfig(seed=1, new_people=6, changed_facts=4)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("knowledge_update") / "base"
    run_in_process(run_dir, base=RECIPE_RUN)
    return run_dir


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_update_changes_only_knowledge_parameters(base_run, tmp_path, zero_stage):
    from pure_reasoner.train.loop import run

    out = tmp_path / "update"
    cfg, resolved = run_config(base_run, out, UPDATE, "knowledge", 4, [f"deepspeed.zero_stage={zero_stage}"])
    assert (cfg.train.trainable, cfg.data.generator, cfg.train.init_from) == \
        ("knowledge", "pure_reasoner.train.world_update:update_corpus", str(base_run / "export"))
    run(cfg, out, resolved)
    before = load_file(base_run / "export" / "model.safetensors")
    after = load_file(out / "export" / "model.safetensors")
    names = {n for n, _ in PureReasonerLM(cfg.model).named_parameters()}
    # The oracle: the layer's attribute names, read off the parameter names; the exports' own tensors compared.
    knowledge = {n for n in names if ".ffn.router." in n or ".ffn.experts." in n}
    changed = {n for n in names if not torch.equal(before[n], after[n])}
    assert knowledge and changed <= knowledge, sorted(changed - knowledge)
    assert any(".experts." in n for n in changed) and any(".router." in n for n in changed)
    assert json.loads((out / "export" / UPDATE_FILE).read_text()) == \
        {"seed": 1, "new_people": 6, "changed_facts": 4, "replay": 0.0}
    if zero_stage == 1:
        report_path = tmp_path / "report.json"
        assert update_eval_main(["--before", str(base_run / "export"), "--after", str(out / "export"),
                                 "--max-examples", "4", "--bits-people", "3", "--json", str(report_path)]) == 0
        report = json.loads(report_path.read_text())
        stored = report["stored"]
        # The oracle for the changed elements: the exports' own tensors compared element by element.
        assert stored["changed_elements"] == sum(int((before[n] != after[n]).sum()) for n in changed)
        assert set(stored["changed_parameters"]) == changed
        # Knowledge off runs neither the experts nor the routers, so what it knows of the new people cannot move.
        assert stored["knowledge_off"]["before"]["bits"] == stored["knowledge_off"]["after"]["bits"]
        assert stored["knowledge_off"]["gained"] == {"bits": 0.0, "fano_bits": 0.0}
        assert stored["people"] == UPDATE.new_people and stored["base"]["after"]["people_scored"] == 3
        assert report["update"] == {"seed": 1, "new_people": 6, "changed_facts": 4, "replay": 0.0}
        assert {"new_people", "changed", "closed_book", "open_book"} <= set(report["splits"])
        assert report["splits"]["changed"]["after"]["n"] == 4
        assert set(report["targets"]) == {"new_vs_pretrained>=0.9", "retained>=0.9", "reading_within_ci"}


def test_run_config_refuses_what_is_not_a_trained_run(tmp_path, base_run):
    with pytest.raises(ValueError, match="no config.yaml"):
        run_config(tmp_path, tmp_path / "out", UPDATE, "knowledge", 4)
    with pytest.raises(ValueError, match="--set"):
        run_config(base_run, tmp_path / "out", UPDATE, "knowledge", 4, ["train.no_such_key=1"])
    with pytest.raises(ValueError, match="changed_facts=99 exceeds the world's"):
        run_config(base_run, tmp_path / "out", UpdateConfig(changed_facts=99), "knowledge", 4)
    assert not (tmp_path / "out").exists()


def base_with(base_run, out, line: str, replacement: str):
    """A copy of ``base_run`` (checkpoints left out) at ``out`` whose config.yaml has ``line`` replaced."""
    shutil.copytree(base_run, out, ignore=shutil.ignore_patterns("checkpoints"))
    text = (out / "config.yaml").read_text()
    assert line in text
    (out / "config.yaml").write_text(text.replace(line, replacement))
    return out


def test_run_config_of_a_base_trained_with_counterfactual_drills(base_run, tmp_path):
    """The update has no drills, so a base run's counterfactual share of them must not carry over (it would fail
    validation: a share of zero fresh drills)."""
    base = base_with(base_run, tmp_path / "base_cf", "counterfactual_drills: 0.0", "counterfactual_drills: 0.5")
    assert load_run_config(base).data.counterfactual_drills == 0.5
    cfg, _ = run_config(base, tmp_path / "out", UPDATE, "knowledge", 4)
    assert (cfg.data.fresh_drills, cfg.data.counterfactual_drills) == (0, 0.0)


def test_update_with_replay_runs_and_records_it(base_run, tmp_path):
    from pure_reasoner.train.data import load_documents

    out = tmp_path / "update-replay"
    assert update_main([str(base_run), "--out", str(out), "--seed", "1", "--new-people", "6", "--changed-facts", "4",
                        "--replay", "1", "--steps", "2", "--no-eval"]) == 0
    recorded = {"seed": 1, "new_people": 6, "changed_facts": 4, "replay": 1.0}
    assert json.loads((out / "export" / UPDATE_FILE).read_text()) == recorded
    cfg = load_run_config(out)
    assert cfg.data.generator_kwargs["update"] == recorded
    own = update_rows(build_update(build_world(load_world_config(base_run / "export" / "world.json")), UPDATE))
    assert len(load_documents(cfg.data, recall=True)) == 2 * len(own)


def test_update_anchored_on_the_replayed_rows_runs(base_run, tmp_path, capsys):
    args = [str(base_run), "--seed", "1", "--new-people", "6", "--changed-facts", "4", "--steps", "2", "--no-eval",
            "--anchor-replayed"]
    assert update_main([*args, "--out", str(tmp_path / "no-replay")]) == 2
    assert "--anchor-replayed anchors the replayed rows: it needs --replay R > 0" in capsys.readouterr().err
    assert not (tmp_path / "no-replay").exists()
    out = tmp_path / "update-anchor-replayed"
    assert update_main([*args, "--replay", "1", "--out", str(out)]) == 0
    cfg = load_run_config(out)
    assert (cfg.objective.anchor_rows, cfg.objective.teacher) == ("marked", str(base_run / "export"))
    assert cfg.objective.anchor_weight == (load_run_config(base_run).objective.anchor_weight or 1.0)
    assert (out / "export" / "model.safetensors").is_file()


def test_update_reports_the_bits_stored_when_asked(base_run, tmp_path, capsys):
    out = tmp_path / "update-bits"
    assert update_main([str(base_run), "--out", str(out), "--new-people", "6", "--changed-facts", "0", "--steps", "3",
                        "--trainable", "experts", "--max-examples", "2", "--bits-people", "2"]) == 0
    stored = json.loads((out / "update_eval.json").read_text())["stored"]
    assert stored["people"] == 6 and stored["base"]["after"]["people_scored"] == 2
    # Only the experts trained: every changed tensor is an expert weight, and knowledge off cannot have moved.
    assert stored["changed_parameters"] and all(".ffn.experts." in n for n in stored["changed_parameters"])
    assert stored["knowledge_off"]["gained"] == {"bits": 0.0, "fano_bits": 0.0}
    assert "stored about 6 new people" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        update_main([str(base_run), "--out", str(tmp_path / "bad"), "--bits-people", "-1"])
    assert "--bits-people must be >= 0, got -1" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_update_refuses_a_bad_replay(base_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert update_main([str(base_run), "--out", str(out), "--replay", "-1", "--steps", "2"]) == 2
    assert "update.replay must be a finite number >= 0, got -1.0" in capsys.readouterr().err
    assert not out.exists()


def test_update_keeps_the_base_exports_consult_thresholds(base_run, tmp_path):
    """A base trained with its export calibrated (train.calibrate_micro_batches) must not have its thresholds
    re-taken on the update's rows: the update's config turns the calibration off."""
    base = base_with(base_run, tmp_path / "base_calibrated", "calibrate_micro_batches: 0", "calibrate_micro_batches: 8")
    assert load_run_config(base).train.calibrate_micro_batches == 8
    for slots in (0, 5):
        cfg, _ = run_config(base, tmp_path / f"out{slots}", UPDATE, "knowledge", 4, slots=slots)
        assert cfg.train.calibrate_micro_batches == 0


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_slot_update_moves_only_the_chosen_units(base_run, tmp_path, zero_stage):
    out = tmp_path / "update-slots"
    assert update_main([str(base_run), "--out", str(out), "--seed", "1", "--new-people", "6", "--changed-facts", "4",
                        "--slots", "5", "--steps", "3", "--no-eval",
                        "--set", f"deepspeed.zero_stage={zero_stage}"]) == 0
    cfg = load_run_config(out)
    assert (cfg.train.trainable, cfg.train.weight_decay) == ("experts", 0.0)
    record = json.loads((out / "slots.json").read_text())
    before = load_file(base_run / "export" / "model.safetensors")
    after = load_file(out / "export" / "model.safetensors")
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # The oracle: the parameter names (only expert weights) and the recorded units, read against the exports.
    assert changed and all(".ffn.experts.w" in n for n in changed), sorted(changed)
    moe_blocks = sorted({n.split(".ffn.")[0] for n in before if ".ffn.experts." in n},
                        key=lambda p: int(p.split(".")[-1]))
    assert len(record["layers"]) == len(moe_blocks)
    for block, layer in zip(moe_blocks, record["layers"], strict=True):
        assert layer["units"] == 5
        w1 = f"{block}.ffn.experts.w1_EDF"
        moved_EF = (before[w1] != after[w1]).any(1) | (before[f"{block}.ffn.experts.w3_EDF"]
                                                       != after[f"{block}.ffn.experts.w3_EDF"]).any(1)
        moved_EF |= (before[f"{block}.ffn.experts.w2_EFD"] != after[f"{block}.ffn.experts.w2_EFD"]).any(2)
        assert sorted(moved_EF.nonzero().tolist()) == sorted(layer["chosen"]), block


def test_slot_update_refuses_what_it_cannot_do(base_run, tmp_path, capsys):
    out = tmp_path / "out"
    small = ["--new-people", "6", "--changed-facts", "4", "--steps", "2"]
    assert update_main([str(base_run), "--out", str(out), "--slots", "4", "--trainable", "all", *small]) == 2
    assert "--slots trains chosen units of the knowledge experts: it needs --trainable knowledge" in \
        capsys.readouterr().err
    assert update_main([str(base_run), "--out", str(out), "--slots", "100000", *small]) == 2
    assert "slots per layer must be in 1.." in capsys.readouterr().err
    assert not out.exists()


def test_update_with_reading_drills_of_the_base_world(base_run, tmp_path):
    """``--set data.fresh_drills=N``: the update's micro-batches end with N reading drills of its base world."""
    from pure_reasoner.train.calibration import one_rank
    from pure_reasoner.train.loop import prepare_data

    out = tmp_path / "update-drills"
    assert update_main([str(base_run), "--out", str(out), "--seed", "1", "--new-people", "6", "--changed-facts", "4",
                        "--steps", "2", "--no-eval", "--set", "data.fresh_drills=1"]) == 0
    cfg = load_run_config(out)
    assert cfg.data.fresh_drills == 1 and cfg.data.generator_kwargs["update"]["seed"] == 1
    train_data, _ = prepare_data(cfg, out, one_rank())
    assert train_data.drills is not None
    assert train_data.drills.world.cfg == load_world_config(base_run / "export" / "world.json")
    batch = train_data.micro_batch(cfg, one_rank(), 0, 0)
    assert batch["idx_BS"].shape[0] == cfg.train.micro_batch_size
    assert torch.equal(batch["idx_BS"][-1], train_data.drills.batch(0, 1)[0][0])
