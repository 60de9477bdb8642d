"""In-run relocation (objective.relocate_at): validation, and a run that switches to relocation midway trains
exactly as the run without it until then, exports its teacher there, and then restarts its schedule."""

from __future__ import annotations

import math

import pytest

from pure_reasoner.train import distill, objectives
from pure_reasoner.train.export import differing_tensors
from pure_reasoner.train.relocation import RELOCATION_TEACHER
from tests.train.helpers import RECIPE_RUN, compose_config, metrics, run_in_process

SMOKE = "experiment=decoupling_smoke"  # max_steps 30, warmup 5, forget 1, read 0.5


@pytest.mark.parametrize(
    "overrides, match",
    [
        (("objective.relocate_at=0",), r"objective.relocate_at must be in \(0, train.max_steps=30\), got 0"),
        (("objective.relocate_at=30",), r"objective.relocate_at must be in \(0, train.max_steps=30\), got 30"),
        (("objective.relocate_at=4",), "objective.relocate_at=4 ends the first schedule: it must be >= "
                                       "train.warmup_steps=5"),
        (("objective.relocate_at=10", "objective.forget_weight=0", "objective.read_weight=0"),
         "objective.relocate_at=10 needs a relocation weight > 0"),
        (("objective.relocate_at=10", "objective.teacher=runs/x/export"),
         "objective.relocate_at=10: the teacher is the run's own model at that step; unset objective.teacher"),
        (("objective.relocate_at=10", "objective.kind=distill", "objective.teacher=runs/x/export",
          "objective.forget_weight=0", "objective.read_weight=0", "objective.route_knowledge=false"),
         "objective.relocate_at=10 needs objective.kind=lm"),
        (("objective.relocate_at=10", "objective.relocate_warmup_steps=21"),
         "objective.relocate_warmup_steps=21 exceeds the 20 steps after objective.relocate_at=10"),
        (("objective.relocate_at=10", "objective.relocate_lr=0"), "objective.relocate_lr must be > 0, got 0"),
        (("objective.relocate_lr=0.001",), "set objective.relocate_at=STEP"),
        (("objective.relocate_warmup_steps=3",), "set objective.relocate_at=STEP"),
    ],
)
def test_bad_relocation_fails_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        compose_config(SMOKE, *overrides)


def test_relocation_config_defaults_and_anchor_without_teacher():
    cfg = compose_config(SMOKE, "objective.relocate_at=10", "objective.anchor_weight=1")
    assert cfg.objective.teacher is None  # the anchor's teacher is the run's own model at relocate_at
    assert (cfg.relocate_lr, cfg.relocate_warmup_steps) == (cfg.train.lr, cfg.train.warmup_steps)
    cfg = compose_config(SMOKE, "objective.relocate_at=10", "objective.relocate_lr=1e-3",
                         "objective.relocate_warmup_steps=0")
    assert (cfg.relocate_lr, cfg.relocate_warmup_steps) == (1e-3, 0)
    with pytest.raises(ValueError, match="anchor_weight=1.0 needs objective.kind=lm and objective.teacher"):
        compose_config(SMOKE, "objective.anchor_weight=1")  # without relocate_at it still needs a teacher


def test_first_run_experiment():
    cfg = compose_config("experiment=first_run")
    obj, t = cfg.objective, cfg.train
    assert cfg.name == "first_run" and cfg.data.doc_mask and obj.consult_targets == "recall"
    assert cfg.model.knowledge.consult_loss_coef == 0.1 and cfg.data.generator_kwargs["num_people"] == 120
    assert (obj.anchor_weight, obj.forget_weight, obj.read_weight) == (1.0, 1.0, 1.0)
    assert obj.teacher is None and t.init_from is None and 0 < obj.relocate_at < t.max_steps
    assert (cfg.relocate_lr, cfg.relocate_warmup_steps) == (1e-3, 20)
    assert t.first_look > 0  # the run ends with the first-look table


RELOCATE_AT, WARMUP, PEAK = 6, 2, 1e-3
RELOCATING = (f"objective.relocate_at={RELOCATE_AT}", "objective.anchor_weight=1",
              f"objective.relocate_lr={PEAK}", f"objective.relocate_warmup_steps={WARMUP}")


def _restarted_lr(k: int, steps: int, min_ratio: float) -> float:
    """The relocation phase's learning rate at its step ``k`` (0-based): linear warmup from 0, then cosine."""
    if k < WARMUP:
        return PEAK * k / WARMUP
    progress = (k - WARMUP + 1) / (steps - WARMUP)
    return PEAK * (min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2)


def test_run_switches_to_relocation_at_relocate_at(tmp_path, monkeypatch, dist_info):
    plain = run_in_process(tmp_path / "plain", "objective.forget_weight=0", "objective.read_weight=0",
                           f"train.max_steps={RELOCATE_AT}", base=RECIPE_RUN)
    calls = {"forget": [], "anchor": []}
    real_forget, real_anchor = objectives.forget_pass, distill.anchor_loss
    step = {"now": -1}

    def counting(name, real):
        def wrapped(*args, **kwargs):
            calls[name].append(step["now"])
            return real(*args, **kwargs)
        return wrapped

    from pure_reasoner.train import data as train_data

    real_positions = train_data.micro_batch_positions

    def positions(s, *args):
        step["now"] = s
        return real_positions(s, *args)

    monkeypatch.setattr(train_data, "micro_batch_positions", positions)
    monkeypatch.setattr(objectives, "forget_pass", counting("forget", real_forget))
    monkeypatch.setattr(distill, "anchor_loss", counting("anchor", real_anchor))
    relocating = run_in_process(tmp_path / "relocating", *RELOCATING, base=RECIPE_RUN)

    # Before the switch: the run without the relocation weights, bit for bit, and no extra pass.
    assert relocating.losses[:RELOCATE_AT] == plain.losses
    after = list(range(RELOCATE_AT, 12))
    assert calls == {"forget": after, "anchor": after}  # one micro-batch per step
    rows, plain_rows = metrics(tmp_path / "relocating"), metrics(tmp_path / "plain")
    assert [r["lr"] for r in rows[:RELOCATE_AT]] == [r["lr"] for r in plain_rows]
    assert all(r["knowledge_off"] == 0 for r in rows[:RELOCATE_AT])
    assert all(r["knowledge_off"] > 0 for r in rows[RELOCATE_AT:])
    # The teacher is the model of step relocate_at: what the plain run exported at its end.
    teacher = tmp_path / "relocating" / RELOCATION_TEACHER
    assert (teacher / "tokenizer.json").is_file()
    assert differing_tensors(teacher, tmp_path / "plain" / "export") == []
    assert not (tmp_path / "relocating" / f".{RELOCATION_TEACHER}.tmp").exists()
    # The schedule restarts: warmup from 0 to relocate_lr, cosine to min_lr_ratio of it at max_steps.
    min_ratio = compose_config(*RECIPE_RUN).train.min_lr_ratio
    expected = [_restarted_lr(k, 12 - RELOCATE_AT, min_ratio) for k in range(12 - RELOCATE_AT)]
    assert [r["lr"] for r in rows[RELOCATE_AT:]] == pytest.approx(expected, rel=1e-12, abs=0)
    assert differing_tensors(tmp_path / "relocating" / "export", teacher) != []  # relocation trained on


TINY_RECIPE = (
    "model=tiny", "model.max_seq_len=512", "data.seq_len=512", "data.generator_kwargs.preset=tiny",
    "data.generator_kwargs.num_people=24", "train.first_look=4", "train.micro_batch_size=4", "train.max_steps=6",
    "train.warmup_steps=2", "objective.relocate_at=4", "objective.relocate_warmup_steps=1", "train.ckpt_every=3",
    "train.log_every=2", "train.progress=false", "train.threads=1", "name=tiny",
)


@pytest.mark.parametrize("recipe", ["first_run", "capacity"])
def test_in_run_relocation_recipes_run_end_to_end(recipe, tmp_path, dist_info):
    """The recipes that relocate in their own run, on the tiny model and world: both phases run and export."""
    overrides = [*TINY_RECIPE] + (["data.fresh_drills=1"] if recipe == "first_run" else [])
    run_in_process(tmp_path / recipe, *overrides, base=(f"experiment={recipe}",))
    rows = metrics(tmp_path / recipe)
    assert [r["step"] for r in rows][-1] == 6
    assert all(r["knowledge_off"] == 0 for r in rows if r["step"] <= 4)
    assert all(r["knowledge_off"] > 0 for r in rows if r["step"] > 4)  # the forget pass runs after relocate_at
    assert (tmp_path / recipe / RELOCATION_TEACHER / "model.safetensors").is_file()
    assert (tmp_path / recipe / "export" / "model.safetensors").is_file()
