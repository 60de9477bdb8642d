"""Export a training checkpoint to ``model.safetensors`` + ``config.json`` + ``tokenizer.json``: a directory that
our stack (``moe.checkpoint.load_pretrained``, ``train.evaluation.evaluate``) and Hugging Face transformers
(``AutoConfig``, ``AutoModelForCausalLM``, ``AutoTokenizer``; see ``moe.hf_files`` and docs/huggingface.md) both load.

The fp32 master weights are rebuilt from the DeepSpeed checkpoint itself (DeepSpeed's ``zero_to_fp32``
merges the ZeRO-1/2 partitions of every rank; without ZeRO, ``deepspeed.zero_stage=0``, fp32 only, the module's
weights are the masters), so the export is exact for fp32 and bf16 runs alike.

CLI: ``python -m pure_reasoner.train.export RUN_DIR [--tag step_00000300] [--out DIR]`` (default ``RUN_DIR/export``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from pure_reasoner.moe import PureReasonerLM
from pure_reasoner.moe.checkpoint import save_pretrained
from pure_reasoner.train import ds_checkpoint as checkpoint
from pure_reasoner.train.config import Config
from pure_reasoner.train.dist import DistInfo, barrier

EXPORT = "export"


def tmp_name(name: str) -> str:
    """Where an export to ``run_dir/name`` is written before it is renamed into place."""
    return f".{name}.tmp"


EXPORT_TMP = tmp_name(EXPORT)  # where the end-of-training export is written before it is renamed to EXPORT


def load_run_config(run_dir: Path) -> Config:
    """The typed Config a run was trained with (its resolved ``config.yaml``)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{run_dir} has no config.yaml: not a training run directory")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path)))


def export_checkpoint(run_dir: Path, tag: str | None = None, out_dir: Path | None = None, calibrated: bool = True,
                      train_data=None) -> Path:
    """Write the checkpoint ``tag`` (default: the latest) of ``run_dir`` as a pretrained model directory.

    With ``train.calibrate_micro_batches`` (and ``calibrated``, the default: False exports the thresholds as trained)
    the consult thresholds are first re-taken over that many micro-batches of the run's stream after its last step
    (``train.calibration``), read from ``train_data`` (the run's ``TrainData``; rebuilt from the run when None)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg = load_run_config(run_dir)
    if cfg.ffn != "pure_reasoner":
        raise ValueError(f"ffn={cfg.ffn!r} is a DeepSpeed baseline; only PureReasonerLM checkpoints export")
    if tag is None:
        found = checkpoint.latest(run_dir)
        if found is None:
            raise ValueError(f"{run_dir} has no complete checkpoint to export")
        tag = found[0]
    root = run_dir / checkpoint.CHECKPOINTS
    if not (root / tag).is_dir():
        raise ValueError(f"no checkpoint {tag!r} under {root}")
    if cfg.train.ep_size > 1:
        from pure_reasoner.train.expert_parallel import gather_expert_state

        state = gather_expert_state(root, tag, cfg)
    elif cfg.deepspeed.zero_stage == 0:  # no ZeRO partitions: the module's fp32 weights are the trained ones
        state = checkpoint.module_state(root / tag)
    else:
        with checkpoint.safe_torch_load():
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    model = PureReasonerLM(cfg.model)
    if cfg.train.trainable != "all":
        state = _with_frozen_from_source(model, state, cfg)
    model.load_state_dict(state, strict=True)
    if calibrated and cfg.train.calibrate_micro_batches:
        from pure_reasoner.train import calibration

        data = train_data if train_data is not None else calibration.run_stream_data(run_dir, cfg)
        calibration.calibrate(model, calibration.stream_batches(data, cfg, 0, cfg.train.calibrate_micro_batches))
    out = out_dir or run_dir / EXPORT
    out.mkdir(parents=True, exist_ok=True)
    _copy_run_files(run_dir, out)  # first: the transformers files describe the tokenizer
    save_pretrained(model, out, hf=True)
    return out


def _with_frozen_from_source(model: PureReasonerLM, state: dict, cfg: Config) -> dict:
    """``state`` with the frozen parameters of ``train.trainable`` taken from ``train.init_from``'s export: they never
    changed, and DeepSpeed's ZeRO-1 checkpoint leaves them out of what ``zero_to_fp32`` merges (ZeRO-2 keeps them,
    in the compute dtype: bf16 runs would round them)."""
    from pure_reasoner.moe.checkpoint import load_pretrained
    from pure_reasoner.train.trainable import set_trainable

    if cfg.train.init_from is None:
        raise ValueError(f"train.trainable={cfg.train.trainable} froze parameters at their fresh init; export needs "
                         "train.init_from to hold them")
    source = load_pretrained(cfg.train.init_from).state_dict()
    frozen = set_trainable(model, cfg.train.trainable)
    return {**state, **{name: source[name] for name in frozen}}


def _copy_run_files(run_dir: Path, out: Path) -> None:
    # the tokenizer, the world train.evaluation asks about, and a knowledge update's new facts (train.world_update)
    for name in ("tokenizer.json", "world.json", "update.json"):
        if (run_dir / name).exists():
            tmp = out / f".{name}.tmp"
            shutil.copyfile(run_dir / name, tmp)
            os.replace(tmp, out / name)


def export_from_engine(engine, cfg: Config, run_dir: Path, info: DistInfo, name: str = EXPORT,
                       train_data=None) -> None:
    """At the end of training: rank 0 exports the latest checkpoint to ``run_dir/export`` (``run_dir/name``; only
    ``export`` gets the thresholds ``train.calibrate_micro_batches`` calibrates, from ``train_data``); the others
    wait. In-run relocation (``train.relocation``) exports its teacher the same way.

    The residual_moe baseline (``ffn=deepspeed_residual``, one expert-parallel rank, fp32) is exported from the
    engine's module, whose fp32 weights are the trained ones (DeepSpeed keeps MoE experts outside the
    ZeRO files that ``zero_to_fp32`` merges)."""
    if info.rank == 0:
        # Written aside and renamed into place, so ``export/`` exists only complete: a run killed while
        # exporting has none, and the same command (which trains no further) exports again.
        tmp = run_dir / tmp_name(name)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)  # from the start: it marks an export under way (scripts/soak.py kills in one)
        if cfg.ffn == "deepspeed_residual":
            from pure_reasoner.train.baselines import save_residual_pretrained

            _copy_run_files(run_dir, save_residual_pretrained(engine.module, tmp))
        else:
            export_checkpoint(run_dir, out_dir=tmp, calibrated=name == EXPORT, train_data=train_data)
        shutil.rmtree(run_dir / name, ignore_errors=True)
        os.rename(tmp, run_dir / name)
    barrier()


def differing_tensors(export_a: Path, export_b: Path) -> list[str]:
    """Names of the tensors (parameters and persistent buffers) of two exports that are not bitwise equal
    (other dtype, shape or bits), and of those only one holds; [] when the exports hold the same weights."""
    import torch
    from safetensors.torch import load_file

    from pure_reasoner.moe.checkpoint import WEIGHTS

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).view(torch.uint8)  # so -0.0 != 0.0 and a NaN equals the same NaN

    a, b = load_file(export_a / WEIGHTS), load_file(export_b / WEIGHTS)
    same = {k for k in a.keys() & b.keys()
            if a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(bits(a[k]), bits(b[k]))}
    return sorted((a.keys() | b.keys()) - same)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pure_reasoner.train.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tag", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        print(export_checkpoint(args.run_dir, args.tag, args.out))
    except ValueError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
