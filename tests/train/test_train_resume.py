"""Checkpoints: resume reproduces an uninterrupted run exactly; a crash mid-save leaves the last good one."""

from __future__ import annotations

import pytest
import torch

import train.checkpoint
import train.export
from moe.checkpoint import load_pretrained
from tests.train.helpers import RECIPE_RUN, Crash, crash_at_step, metrics, run_in_process
from train.export import differing_tensors, export_checkpoint
from train.metrics import read_curve


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dist_info):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    summary = run_in_process(run_dir)
    return run_dir, summary


def test_resume_is_exact(tmp_path, monkeypatch, uninterrupted):
    ref_dir, ref = uninterrupted
    with monkeypatch.context() as patch:
        crash_at_step(patch, 10)  # after the checkpoint of step 8
        with pytest.raises(Crash):
            run_in_process(tmp_path)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000008"
    resumed = run_in_process(tmp_path)
    assert resumed.resumed_from == "step_00000008"
    assert resumed.losses == ref.losses[8:]  # bitwise: same weights, optimizer, schedule, data, controllers
    rows, ref_rows = metrics(tmp_path), metrics(ref_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))  # rows logged after step 8 by the crashed run are gone
    for key in ("loss", "lr", "grad_norm", "consult_rate_l0"):
        assert [r[key] for r in rows] == [r[key] for r in ref_rows], key


def test_rows_not_yet_logged_at_a_checkpoint_survive_a_crash(tmp_path, monkeypatch, uninterrupted):
    # log_every=3 does not divide ckpt_every=4: rows of steps after the last logged one and up to the
    # checkpoint must be in metrics.csv by the time the checkpoint is, or a crash before the next log loses them.
    ref_dir, _ = uninterrupted
    with monkeypatch.context() as patch:
        crash_at_step(patch, 5)  # after the checkpoint of step 4, before step 6 is logged
        with pytest.raises(Crash):
            run_in_process(tmp_path, "train.log_every=3")
    run_in_process(tmp_path, "train.log_every=3")
    assert read_curve(tmp_path) == read_curve(ref_dir)


@pytest.mark.parametrize("ablation", ["knowledge_off", "recall_mean"])
def test_resume_is_exact_with_the_decoupling_recipe(tmp_path, monkeypatch, dist_info, ablation):
    # Knowledge in context, fresh drills, consult targets, gradient routing, the knowledge-off forget pass
    # (recall_mean runs router and experts in it too); on two expert-parallel ranks:
    # tests/reliability/test_soak_short.py.
    forget = f"objective.forget_ablation={ablation}"
    ref = run_in_process(tmp_path / "uninterrupted", forget, base=RECIPE_RUN)
    with monkeypatch.context() as patch:
        crash_at_step(patch, 10)  # after the checkpoint of step 8
        with pytest.raises(Crash):
            run_in_process(tmp_path / "crashed", forget, base=RECIPE_RUN)
    resumed = run_in_process(tmp_path / "crashed", forget, base=RECIPE_RUN)
    assert resumed.resumed_from == "step_00000008"
    assert resumed.losses == ref.losses[8:]
    assert read_curve(tmp_path / "crashed") == read_curve(tmp_path / "uninterrupted")  # every column but wall time
    assert differing_tensors(tmp_path / "crashed" / "export", tmp_path / "uninterrupted" / "export") == []


def test_crash_during_save_keeps_last_good_checkpoint(tmp_path, monkeypatch, uninterrupted):
    _, ref = uninterrupted
    real = train.checkpoint.save_file
    with monkeypatch.context() as patch:

        def save_file(tensors, path):
            if "step_00000008" in str(path):
                raise Crash("killed while writing checkpoint 8")
            return real(tensors, path)

        patch.setattr(train.checkpoint, "save_file", save_file)
        with pytest.raises(Crash):
            run_in_process(tmp_path)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_00000004"
    assert (root / ".tmp-step_00000008").is_dir() and not (root / "step_00000008").exists()
    resumed = run_in_process(tmp_path)
    assert resumed.resumed_from == "step_00000004"
    assert not (root / ".tmp-step_00000008").exists()
    assert resumed.losses == ref.losses[4:]


def test_export_loads_back(uninterrupted, tmp_path):
    run_dir, _ = uninterrupted
    model = load_pretrained(run_dir / "export")
    assert (run_dir / "export" / "tokenizer.json").is_file()
    assert (run_dir / "export" / "world.json").is_file()  # the world train.eval asks about
    # The export equals the fp32 weights DeepSpeed checkpointed, re-exported on demand from the same tag.
    again = load_pretrained(export_checkpoint(run_dir, "step_00000012", tmp_path / "again"))
    idx = torch.randint(0, model.cfg.vocab_size, (2, 16))
    torch.testing.assert_close(again(idx).logits_BSV, model(idx).logits_BSV, rtol=0, atol=0)
    # and the controller state (selection biases) travelled with the weights
    assert float(model.moe_layers()[0].router.consult_cut) != 0.0


def test_crash_during_export_is_exported_by_the_same_command(tmp_path, monkeypatch, uninterrupted):
    ref_dir, _ = uninterrupted
    with monkeypatch.context() as patch:

        def save_pretrained(model, out):
            (out / "config.json").parent.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text("{")  # killed a few bytes into the export
            raise Crash("killed while exporting")

        patch.setattr(train.export, "save_pretrained", save_pretrained)
        with pytest.raises(Crash):
            run_in_process(tmp_path)
    again = run_in_process(tmp_path)
    assert again.resumed_from == "step_00000012" and again.losses == []  # nothing trained again
    assert differing_tensors(tmp_path / "export", ref_dir / "export") == []
    assert (tmp_path / "export" / "tokenizer.json").is_file()


def test_finished_run_is_not_rerun(uninterrupted):
    run_dir, ref = uninterrupted
    again = run_in_process(run_dir)
    assert again.resumed_from == "step_00000012" and again.losses == []


def test_zero2_bf16_exports_fp32_master_weights(tmp_path, dist_info):
    summary = run_in_process(tmp_path, "deepspeed=[zero2,bf16]", "train.max_steps=4", "train.warmup_steps=1")
    assert all(torch.isfinite(torch.tensor(summary.losses)))
    model = load_pretrained(tmp_path / "export")
    w = model.blocks[0].attn.wq.weight
    assert w.dtype == torch.float32
    assert (w != w.bfloat16().float()).any()  # the fp32 master copy, not the bf16 working weights
