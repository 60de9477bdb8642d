"""Crash-safe DeepSpeed checkpoints, resume, and export to one safetensors file.

Layout under ``<run dir>/checkpoints``: ``step_00000100/`` (DeepSpeed's files, every rank's RNG state,
``trainer_state.json``) and ``latest`` (the tag of the newest complete checkpoint).

A save writes into ``.tmp-step_.../``, fsyncs it, renames it to ``step_.../`` and only then replaces
``latest`` (temporary file + rename). A process killed at any point leaves ``latest`` naming a complete
checkpoint; half-written ``.tmp-*`` directories are removed by the next run. A save that fails (e.g. a
full disk) removes its ``.tmp-*`` directory and raises ``OSError`` naming the step; ``latest`` is untouched.

Loading never runs code from the files: DeepSpeed's ``torch.load`` calls are forced to ``weights_only``
(``safe_torch_load``), with only the few DeepSpeed classes its checkpoints hold allowlisted.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pure_reasoner.train.dist import DistInfo, barrier

CHECKPOINTS, LATEST, TMP_PREFIX, STATE = "checkpoints", "latest", ".tmp-", "trainer_state.json"


@contextmanager
def safe_torch_load() -> Iterator[None]:
    """Every ``torch.load`` inside (DeepSpeed's included, which pass ``weights_only=False``) unpickles weights only.

    A pickle carrying code then fails with ``UnpicklingError`` instead of running. The environment
    variable is read per call by ``torch.load``; the previous value is restored on exit.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    key, before = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def module_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The module's weights in DeepSpeed's model-states file of one checkpoint directory, in fp32 (the trained
    weights of fp32 runs without ZeRO partitions; bf16 runs' are rounded)."""
    with safe_torch_load():
        module = torch.load(ckpt_dir / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    return {k: v.float() for k, v in module.items()}


def latest(run_dir: Path) -> tuple[str, dict] | None:
    """(tag, trainer state) of the newest complete checkpoint, or None when there is none."""
    pointer = run_dir / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    state = run_dir / CHECKPOINTS / tag / STATE
    if not state.is_file():
        raise ValueError(f"{pointer} names {tag!r}, but {state} is missing: the checkpoint directory was damaged")
    return tag, json.loads(state.read_text())


def remove_partial(run_dir: Path) -> None:
    """Delete ``.tmp-*`` directories left by a save that was interrupted (call on rank 0 before training)."""
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        for tmp in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(tmp)


def save(engine, run_dir: Path, state: dict, info: DistInfo, keep: int) -> str:
    """Write a complete checkpoint of ``engine`` plus ``state`` (JSON-able) and every rank's RNG. All ranks call it."""
    root = run_dir / CHECKPOINTS
    tag = tag_for(state["step"])
    tmp_tag = TMP_PREFIX + tag
    if info.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    barrier()
    try:
        engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)  # ends in a barrier
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, root / tmp_tag / f"rng_rank{info.rank}.safetensors")
        barrier()
        if info.rank == 0:
            (root / tmp_tag / STATE).write_text(json.dumps(state, indent=2))
            for path in sorted((root / tmp_tag).rglob("*"), reverse=True):
                _fsync(path)
            _fsync(root / tmp_tag)
    except OSError as err:  # e.g. ENOSPC: drop the partial copy so the disk is not left fuller
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
        pointer = root / LATEST
        kept = pointer.read_text().strip() if pointer.is_file() else "none"
        raise OSError(err.errno, f"could not write checkpoint {tag} under {root} ({err}); latest stays {kept}") from err
    if info.rank == 0:
        if (root / tag).exists():  # a step redone after a crash; `latest` names an older tag, so this is safe
            shutil.rmtree(root / tag)
        os.rename(root / tmp_tag, root / tag)
        _fsync(root)
        _write_atomic(root / LATEST, tag)
        _prune(root, keep, tag)
    barrier()
    return tag


def _prune(root: Path, keep: int, newest: str) -> None:
    tags = sorted(p.name for p in root.glob("step_*") if p.is_dir())
    for old in tags[:-keep]:
        if old != newest:
            shutil.rmtree(root / old)


def load(engine, run_dir: Path, tag: str, info: DistInfo) -> None:
    """Restore model, optimizer, scheduler (DeepSpeed) and this rank's RNG from checkpoint ``tag``."""
    root = run_dir / CHECKPOINTS
    with safe_torch_load():
        path, _ = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {root / tag}")
    rng = load_file(root / tag / f"rng_rank{info.rank}.safetensors")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
