"""Each science recipe's experiment config composes to the config its recorded protocol runs trained with.

``results/runs.json`` keeps the exact command of every protocol run (overrides given on the command line);
``experiment=<recipe>`` must give the same typed Config, so that rerunning a recipe by name reruns what the
results report. And every recipe's config trains end to end at a toy size (the relocations from toy phase-one runs).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from tests.train.helpers import compose_config

RUNS = Path(__file__).resolve().parents[2] / "results" / "runs.json"
RECIPES = ("recall_docmask", "dense_docmask", "relocate_docmask")


def _recorded_overrides(recipe: str, seed: int) -> list[str]:
    """The overrides of ``python -m pure_reasoner.train ...`` as the protocol recorded them for one seed."""
    entry = json.loads(RUNS.read_text())[f"{recipe}_seed{seed}"]
    train_cmd = shlex.split(entry["commands"][0])
    assert train_cmd[:3] == ["python", "-m", "pure_reasoner.train"], train_cmd
    return train_cmd[3:]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_config_is_what_its_runs_trained(recipe):
    recorded = _recorded_overrides(recipe, seed=1)
    # A run recorded as experiment=<recipe> would compare the config with itself: only explicit commands count.
    assert f"experiment={recipe}" not in recorded, recorded
    protocol_set = [o for o in recorded if o.split("=")[0].lstrip("+") in
                    ("name", "train.seed", "data.generator_kwargs.seed", "data.generator_kwargs.eval_examples")]
    assert len(protocol_set) == 4, recorded
    assert compose_config(f"experiment={recipe}", *protocol_set) == compose_config(*recorded)


def test_recipes_differ_from_their_base():
    """The comparison above can fail: the recipe differs from the plain decoupling experiment it builds on."""
    overrides = ("name=x", "train.seed=1")
    recipe, base = (compose_config(f"experiment={name}", *overrides) for name in ("recall_docmask", "decoupling"))
    assert recipe != base
    assert (compose_config("experiment=relocate_docmask", *overrides).train.init_from
            == "runs/recall_docmask-seed1/export")


# Each recipe's own config, run end to end at a toy size: 2 steps on a 24-person world. The relocation recipes and
# the equal-tokens control start from the phase-one runs' exports, as under the protocol.
TOY = ("train.max_steps=2", "train.warmup_steps=1", "train.ckpt_every=2", "train.log_every=1", "train.progress=false",
       "train.threads=1", "data.generator_kwargs.num_people=24", "data.generator_kwargs.num_unseen=12")


@pytest.fixture(scope="module")
def phase_one(tmp_path_factory) -> dict[str, Path]:
    from tests.train.helpers import run_in_process

    root = tmp_path_factory.mktemp("recipes")
    runs = {}
    for recipe in ("recall_docmask", "recall_keys_docmask", "dense_docmask"):
        run_in_process(root / recipe, f"experiment={recipe}", *TOY, base=())
        runs[recipe] = root / recipe / "export"
    return runs


@pytest.mark.parametrize("recipe, start", [
    ("relocate_docmask", "recall_docmask"), ("relocate_cf", "recall_docmask"),
    ("relocate_cf_noanchor", "recall_docmask"), ("relocate_cf_anchor2", "recall_docmask"),
    ("relocate_keys_cf", "recall_keys_docmask"), ("relocate_keys_cf_release", "recall_keys_docmask"),
    ("relocate_keys_cf_release400", "recall_keys_docmask"), ("relocate_keys_cf_release_allcf", "recall_keys_docmask"),
    ("relocate_keys_cf_release_read", "recall_keys_docmask"),
    ("relocate_keys_cf_release_read_anchored", "recall_keys_docmask"),
    ("relocate_keys_cf_release_read_reasoner", "recall_keys_docmask"),
    ("relocate_keys_cf_release_read_release", "recall_keys_docmask"),
    ("relocate_keys_cf_release_read_release_anchored", "recall_keys_docmask"),
    ("relocate_keys_cf_release_dates", "recall_keys_docmask"),
    ("relocate_keys_cf_release_read_wide", "recall_keys_docmask"),
    ("relocate_keys_cf_release_read_wide_release", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_read", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_consulting", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_consulting_read3", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_consulting_meanread", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_consulting_knowledge", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_consulting_split", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_consulting_drillread3", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_knowledge", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_prior", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_prior_reverse", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_prior_split", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_meanprior", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_meanprior4", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_meanprior16", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_consulting_meanprior", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_consulting_meanprior4", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_consulting_knowledge_meangrad", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_consulting_knowledge_meangrad_light", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_consulting_knowledge_meangrad_prior", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_consulting_knowledge_meangrad_matched",
     "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_consulting_knowledge_meangrad_light_free",
     "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_consulting_knowledge_meangrad_light_values",
     "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_consulting_knowledge_meangrad_light_values10",
     "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_release_both_anchored_consulting_knowledge_meangrad_light_relocated",
     "recall_keys_docmask"),
    ("relocate_keys_cf_release_read_wide_keep", "recall_keys_docmask"),
    ("relocate_keys_cf_release_read_wide_keep_release", "recall_keys_docmask"),
    ("relocate_keys_cf_release_keep_copy", "recall_keys_docmask"),
    ("relocate_keys_cf_release_keep_copy_read", "recall_keys_docmask"),
    ("relocate_keys_cf_release_keep_copy_release", "recall_keys_docmask"),
    ("relocate_keys_cf_release_keep_copy_release_both_anchored_consulting_knowledge_meangrad_light",
     "recall_keys_docmask"),
    ("relocate_keys_cf_release_keep_copy_both_anchored_consulting_knowledge_meangrad_light", "recall_keys_docmask"),
    ("relocate_keys_cf_release_keep_light_copy", "recall_keys_docmask"),
    ("relocate_keys_cf_release_keep_light_copy_read", "recall_keys_docmask"),
    ("relocate_keys_cf_release_keep_light_copy_both_anchored_consulting_knowledge_meangrad_light",
     "recall_keys_docmask"),
    ("relocate_keys_cf_release_keep_copy_read_copy", "recall_keys_docmask"),
    ("relocate_keys_cf_release_keep_copy_read_copy_both_anchored_consulting_knowledge_meangrad_light",
     "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_read_keep", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_read_keep_both_anchored_consulting_knowledge_meangrad_light",
     "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_read_keep_both_anchored_consulting_knowledge_meangrad_lighter",
     "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_read_keep2", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_read_keep2_both_anchored_consulting_knowledge_meangrad_light",
     "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_read_keep_rehearsed", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_read_keep_knowledge", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_read_keep_strong", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_read_keep_strong_both_anchored_consulting_knowledge_meangrad_light",
     "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_read_keep_strong_both_anchored_consulting_knowledge_meangrad_light_calibrated",
     "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_read_keep_strong_both_anchored_consulting_knowledge_meangrad_light_calibrated_held",
     "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_read_keep_strong_both_anchored_consulting_knowledge_meangrad_light_ring8",
     "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_anchored", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_anchored_read", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_dateless", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_dateless_read", "recall_keys_docmask"),
    ("relocate_keys_cf_release_copy_dateless_read_both_anchored_consulting_knowledge_meangrad_light",
     "recall_keys_docmask"),
    ("dense_cont_cf", "dense_docmask"), ("capacity", None), ("recall_keys_docmask_numbers", None),
])
def test_recipe_runs_end_to_end_at_toy_size(phase_one, tmp_path, recipe, start):
    from tests.train.helpers import run_in_process

    overrides = [f"experiment={recipe}", *TOY]
    if start is not None:
        overrides.append(f"train.init_from={phase_one[start]}")
        if compose_config(f"experiment={recipe}").objective.teacher:
            overrides.append(f"objective.teacher={phase_one[start]}")
    if recipe == "capacity":  # in-run relocation: the switch must fall inside the 2 steps
        overrides += ["objective.relocate_at=1", "objective.relocate_warmup_steps=0"]
    if compose_config(f"experiment={recipe}").train.calibrate_micro_batches:  # its 64 at toy size: a few seconds
        overrides.append("train.calibrate_micro_batches=2")
    summary = run_in_process(tmp_path / recipe, *overrides, base=())
    assert summary.steps == 2 and (tmp_path / recipe / "export" / "model.safetensors").is_file()
    trainable = compose_config(f"experiment={recipe}").train.trainable
    if trainable in ("reasoner", "knowledge"):
        _assert_only_one_side_moved(phase_one[start], tmp_path / recipe / "export", trainable)


def _assert_only_one_side_moved(before: Path, after: Path, trainable: str) -> None:
    """trainable=reasoner: the knowledge experts and routers are the starting model's exactly, the rest moved;
    trainable=knowledge: the other way round."""
    from pure_reasoner.moe.checkpoint import load_pretrained

    old, new = (load_pretrained(path).state_dict() for path in (before, after))
    knowledge = {n for n in old if ".ffn.experts." in n or ".ffn.router." in n}
    rest = old.keys() - knowledge
    frozen, moved = (knowledge, rest) if trainable == "reasoner" else (rest, knowledge)
    assert frozen and all(torch.equal(old[n], new[n]) for n in frozen)
    assert not all(torch.equal(old[n], new[n]) for n in moved)
