"""Runs that start from an exported model (``train.init_from``): its weights and its tokenizer.

Relocation (move facts learned in a first run into the knowledge experts) and knowledge updates (teach a
trained model new facts) continue from a ``train.export`` directory instead of a fresh init.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from pure_reasoner.moe import ModelConfig, PureReasonerLM
from pure_reasoner.moe.checkpoint import load_pretrained
from pure_reasoner.moe.router import spread_rows
from pure_reasoner.train.chain import missing_export
from pure_reasoner.train.data import TOKENIZER

# Knowledge-config fields that weight a training loss and nothing else: a run may start from a model trained with
# other values of them (the weights mean the same).
LOSS_COEFFICIENTS = ("consult_loss_coef", "balance_loss_coef", "z_loss_coef")
# Knowledge-config fields a run may also set apart from its source: ``reference_tokens`` sizes the routing
# controllers' reference ring, selection-only state that ``init_weights`` refills from the source's ring.
FREE_FIELDS = (*LOSS_COEFFICIENTS, "reference_tokens")


def adopt_tokenizer(src: Path, run_dir: Path, rank: int, what: str) -> None:
    """Rank 0 copies ``src``'s tokenizer into ``run_dir`` when the run has none yet, so the run reads the same
    token ids as the model in ``src``. Raises ValueError naming ``what`` (the config key) when ``src`` has none."""
    if not (src / TOKENIZER).is_file():
        raise ValueError(f"{what}={src} has no {TOKENIZER}")
    if rank == 0 and not (run_dir / TOKENIZER).exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / TOKENIZER, run_dir / TOKENIZER)


def check_source(directory: str, model_cfg: ModelConfig, ep_size: int) -> PureReasonerLM:
    """The model exported in ``directory`` (``train.init_from``), loaded on CPU, checked before anything is written.

    Raises ValueError naming the directory when it is missing or unreadable, or the fields of the model config that
    differ from ``model_cfg`` (the knowledge config's ``FREE_FIELDS`` may differ), or when ``ep_size`` > 1
    (each rank would hold only its own experts)."""
    src = Path(directory)
    if ep_size != 1:
        raise ValueError(f"train.init_from needs train.ep_size=1, got {ep_size}")
    if not src.is_dir():
        raise ValueError(missing_export("train.init_from", directory))
    source = load_pretrained(src)
    ours_knowledge = {key: getattr(model_cfg.knowledge, key) for key in FREE_FIELDS}
    compared = dataclasses.replace(source.cfg, knowledge=dataclasses.replace(source.cfg.knowledge, **ours_knowledge))
    if compared != model_cfg:
        theirs, ours = dataclasses.asdict(source.cfg), dataclasses.asdict(model_cfg)
        diff = {key: (theirs[key], ours[key]) for key in ours if theirs.get(key) != ours[key]}
        raise ValueError(f"train.init_from={src} has another model config; (theirs, ours): {diff}")
    return source


def init_weights(model: PureReasonerLM, source: PureReasonerLM) -> None:
    """Copy ``source``'s parameters and buffers (the routing controllers' included) into ``model``.

    Where the two differ in ``reference_tokens``, each router's reference ring [R, D] is the source's ring
    [R', D] with its rows spread evenly over the R rows (each repeated when R > R', an even sample when R < R'):
    the margins' distribution over it, and so the next threshold refresh, is about the source's. The threshold
    itself is copied; the ring's write position starts at row 0."""
    state = source.state_dict()
    for name, ring_RD in model.state_dict().items():
        if name.endswith("reference_x_RD") and state[name].shape != ring_RD.shape:
            position = name.removesuffix("reference_x_RD") + "reference_next"
            state[name] = spread_rows(state[name], ring_RD.shape[0])
            state[position] = torch.zeros_like(state[position])
    model.load_state_dict(state, strict=True)
