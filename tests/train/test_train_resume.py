"""Checkpoints: resume reproduces an uninterrupted run exactly; a crash mid-save leaves the last good one."""

from __future__ import annotations

import pytest
import torch

from pure_reasoner.moe.checkpoint import load_pretrained
from pure_reasoner.train import ds_checkpoint as train_ds_checkpoint
from pure_reasoner.train import export as train_export
from pure_reasoner.train.export import differing_tensors
from pure_reasoner.train.metrics import read_curve
from tests.train.helpers import RECIPE_RUN, Crash, crash_at_step, metrics, run_in_process


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dist_info):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    summary = run_in_process(run_dir)
    return run_dir, summary


def _capture_trained_state(patch, masters: bool = True) -> dict:
    """Make the end-of-training export first copy what the engine holds: its module's state (weights and
    controller buffers) and, with ``masters`` (ZeRO runs; without ZeRO the module's weights are the only copy),
    DeepSpeed's fp32 master copy of every parameter."""
    from deepspeed.utils import safe_get_full_fp32_param

    from pure_reasoner.train import export as train_export

    captured, real = {}, train_export.export_from_engine

    def export_from_engine(engine, *args, **kwargs):
        captured["state"] = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        if masters:
            captured["fp32"] = {n: safe_get_full_fp32_param(p).detach().clone()
                                for n, p in engine.module.named_parameters()}
        return real(engine, *args, **kwargs)

    patch.setattr(train_export, "export_from_engine", export_from_engine)
    return captured


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


@pytest.mark.parametrize(("ablation", "extra"), [("knowledge_off", ()), ("recall_mean", ()),
                                                 ("knowledge_off", ("data.counterfactual_drills=0.5",))],
                         ids=["knowledge_off", "recall_mean", "counterfactual_drills"])
def test_resume_is_exact_with_the_decoupling_recipe(tmp_path, monkeypatch, dist_info, ablation, extra):
    # Knowledge in context, fresh drills (optionally counterfactual ones), consult targets, gradient routing, the
    # knowledge-off forget pass (recall_mean runs router and experts in it too); on two expert-parallel ranks:
    # tests/reliability/test_soak_short.py.
    forget = (f"objective.forget_ablation={ablation}", *extra)
    ref = run_in_process(tmp_path / "uninterrupted", *forget, base=RECIPE_RUN)
    with monkeypatch.context() as patch:
        crash_at_step(patch, 10)  # after the checkpoint of step 8
        with pytest.raises(Crash):
            run_in_process(tmp_path / "crashed", *forget, base=RECIPE_RUN)
    resumed = run_in_process(tmp_path / "crashed", *forget, base=RECIPE_RUN)
    assert resumed.resumed_from == "step_00000008"
    assert resumed.losses == ref.losses[8:]
    assert read_curve(tmp_path / "crashed") == read_curve(tmp_path / "uninterrupted")  # every column but wall time
    assert differing_tensors(tmp_path / "crashed" / "export", tmp_path / "uninterrupted" / "export") == []


RELOCATING = ("objective.relocate_at=6", "objective.anchor_weight=1", "objective.relocate_lr=1e-3",
              "objective.relocate_warmup_steps=2")


@pytest.fixture(scope="module")
def relocating(tmp_path_factory, dist_info):
    run_dir = tmp_path_factory.mktemp("relocating")
    return run_dir, run_in_process(run_dir, *RELOCATING, base=RECIPE_RUN)


@pytest.mark.parametrize(("crash", "resumed_from"), [(5, 4), (7, 6), (10, 8)],
                         ids=["before_the_switch", "at_the_switch", "after_the_switch"])
def test_resume_is_exact_with_in_run_relocation(tmp_path, monkeypatch, relocating, crash, resumed_from):
    # The switch at step 6 (objective.relocate_at) checkpoints step 6 and exports it as the teacher. Resumed from
    # step 4 the run switches when it gets there; from step 6 it switches again (the same teacher); from step 8
    # it reloads the teacher from relocation_teacher/ (not the live model, which has trained on) and the
    # restarted schedule where the checkpoint left it.
    ref_dir, ref = relocating
    with monkeypatch.context() as patch:
        crash_at_step(patch, crash)
        with pytest.raises(Crash):
            run_in_process(tmp_path, *RELOCATING, base=RECIPE_RUN)
    teacher = tmp_path / "relocation_teacher" / "model.safetensors"
    written = teacher.stat().st_mtime_ns if crash > 6 else None
    resumed = run_in_process(tmp_path, *RELOCATING, base=RECIPE_RUN)
    assert resumed.resumed_from == f"step_{resumed_from:08d}"
    assert resumed.losses == ref.losses[resumed_from:]
    assert read_curve(tmp_path) == read_curve(ref_dir)  # every column but wall time, the lr included
    assert differing_tensors(tmp_path / "export", ref_dir / "export") == []
    assert differing_tensors(tmp_path / "relocation_teacher", ref_dir / "relocation_teacher") == []
    if resumed_from > 6:
        assert teacher.stat().st_mtime_ns == written  # loaded, not exported again


def test_crash_during_save_keeps_last_good_checkpoint(tmp_path, monkeypatch, uninterrupted):
    _, ref = uninterrupted
    real = train_ds_checkpoint.save_file
    with monkeypatch.context() as patch:

        def save_file(tensors, path):
            if "step_00000008" in str(path):
                raise Crash("killed while writing checkpoint 8")
            return real(tensors, path)

        patch.setattr(train_ds_checkpoint, "save_file", save_file)
        with pytest.raises(Crash):
            run_in_process(tmp_path)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_00000004"
    assert (root / ".tmp-step_00000008").is_dir() and not (root / "step_00000008").exists()
    resumed = run_in_process(tmp_path)
    assert resumed.resumed_from == "step_00000004"
    assert not (root / ".tmp-step_00000008").exists()
    assert resumed.losses == ref.losses[4:]


def test_export_equals_the_trained_engine(tmp_path, dist_info):
    with pytest.MonkeyPatch.context() as patch:
        trained = _capture_trained_state(patch)
        run_in_process(tmp_path, "train.max_steps=6")
    exported = load_pretrained(tmp_path / "export").state_dict()
    assert (tmp_path / "export" / "tokenizer.json").is_file()
    assert (tmp_path / "export" / "world.json").is_file()  # the world train.evaluation.evaluate asks about
    assert exported.keys() == trained["state"].keys()
    for name, tensor in trained["state"].items():  # weights and controller state (selection biases, cut)
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, msg=name)
    for name, master in trained["fp32"].items():
        torch.testing.assert_close(exported[name], master, rtol=0, atol=0, msg=name)
    assert float(exported["blocks.0.ffn.router.margin_threshold"]) != 0.0  # the controller did move
    _check_transformers_loads(tmp_path / "export")


def _check_transformers_loads(export):
    """The main job's export is a transformers model too: same logits as our stack, its tokenizer as ours."""
    pytest.importorskip("transformers", reason="transformers not installed (pip install '.[dev]')")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pure_reasoner.moe.hf  # noqa: F401  registers the auto classes
    from pure_reasoner.train.evaluation.evaluate import load

    ours, codec = load(export)
    hf = AutoModelForCausalLM.from_pretrained(export)
    text = "Where was Ana born?\nShe was born in"
    ids = torch.tensor([codec.encode(text)])
    assert AutoTokenizer.from_pretrained(export)(text, add_special_tokens=False).input_ids == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits_BSV, rtol=0, atol=1e-5)


def test_crash_during_export_is_exported_by_the_same_command(tmp_path, monkeypatch, uninterrupted):
    ref_dir, _ = uninterrupted
    with monkeypatch.context() as patch:

        def save_pretrained(model, out, **_):
            (out / "config.json").parent.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text("{")  # killed a few bytes into the export
            raise Crash("killed while exporting")

        patch.setattr(train_export, "save_pretrained", save_pretrained)
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
    with pytest.MonkeyPatch.context() as patch:
        trained = _capture_trained_state(patch)
        summary = run_in_process(tmp_path, "deepspeed=[zero2,bf16]", "train.max_steps=4", "train.warmup_steps=1")
    assert all(torch.isfinite(torch.tensor(summary.losses)))
    exported = load_pretrained(tmp_path / "export").state_dict()
    for name, master in trained["fp32"].items():  # DeepSpeed's fp32 masters, read from the live engine
        assert master.dtype == torch.float32
        torch.testing.assert_close(exported[name], master, rtol=0, atol=0, msg=name)
    for name, working in trained["state"].items():  # the bf16 working weights are the masters rounded
        torch.testing.assert_close(exported[name].to(working.dtype), working, rtol=0, atol=0, msg=name)
    w = exported["blocks.0.attn.wq.weight"]
    assert (w != w.bfloat16().float()).any()  # the fp32 master copy, not the bf16 working weights


def test_zero0_resumes_exactly_and_exports_the_engine(tmp_path, dist_info):
    """Without ZeRO (``deepspeed=zero0``) the checkpoint holds the module's weights and the whole optimizer: a crashed
    run resumes bitwise, and the export is the engine's weights (no ZeRO partitions for ``zero_to_fp32`` to merge)."""
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "crashed"
    with pytest.MonkeyPatch.context() as patch:
        trained = _capture_trained_state(patch, masters=False)
        ref = run_in_process(ref_dir, "deepspeed=zero0")
    assert not list((ref_dir / "checkpoints" / "step_00000012").glob("zero_pp_rank_*"))  # no ZeRO partitions
    exported = load_pretrained(ref_dir / "export").state_dict()
    assert exported.keys() == trained["state"].keys()
    for name, tensor in trained["state"].items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, msg=name)
    with pytest.MonkeyPatch.context() as patch:
        crash_at_step(patch, 10)
        with pytest.raises(Crash):
            run_in_process(run_dir, "deepspeed=zero0")
    resumed = run_in_process(run_dir, "deepspeed=zero0")
    assert resumed.resumed_from == "step_00000008"
    assert resumed.losses == ref.losses[8:]
