"""In-run relocation (``objective.relocate_at``): one run trains a model, then moves its facts into its knowledge
experts.

Before ``relocate_at`` the run trains with the relocation weights (``objective.anchor_weight``, ``forget_weight``,
``read_weight``) off, exactly as the same config without them would. At ``relocate_at`` (the loop has just
checkpointed that step) rank 0 exports the model to ``<run dir>/relocation_teacher`` as the end of training exports
(``train.export.export_from_engine``: written aside, renamed into place; the other ranks wait); every rank loads it
as the frozen teacher as ``objective.teacher`` is loaded (``train.distill.load_teacher``); the weights apply from then
on; and the learning rate restarts (``train.engine.restart_schedule``). That is the two-run relocation recipe
(``train.init_from`` and ``objective.teacher`` both the first run's export) in one run, except that the optimizer's
moments carry over. A run resumed past ``relocate_at`` reloads the teacher from ``relocation_teacher`` and the
restarted schedule at the iteration its checkpoint holds; one resumed before it switches when it gets there.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from pure_reasoner.moe import PureReasonerLM
from pure_reasoner.train import distill, ds_checkpoint
from pure_reasoner.train.config import Config
from pure_reasoner.train.dist import DistInfo
from pure_reasoner.train.engine import restart_schedule

log = logging.getLogger("train")

RELOCATION_TEACHER = "relocation_teacher"


class Relocation:
    """The two phases of a run with ``objective.relocate_at`` (one phase, ``cfg`` throughout, without it).

    before / after: the configs steps before and from ``relocate_at`` train with: ``cfg`` without the relocation
        weights, and ``cfg`` with ``objective.teacher`` the run's ``relocation_teacher``; neither relocates again.
    """

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg, self.run_dir, self.at = cfg, run_dir, cfg.objective.relocate_at
        self.before = self.after = cfg
        if self.at is not None:
            obj = cfg.objective
            once = {"relocate_at": None, "relocate_lr": None, "relocate_warmup_steps": None}
            self.before = dataclasses.replace(cfg, objective=dataclasses.replace(
                obj, anchor_weight=0.0, anchor_rows="all", anchor_skip=None, forget_weight=0.0, read_weight=0.0,
                **once))
            self.after = dataclasses.replace(cfg, objective=dataclasses.replace(
                obj, teacher=str(self.teacher_dir), **once))

    @property
    def teacher_dir(self) -> Path:
        return self.run_dir / RELOCATION_TEACHER

    def config(self, step: int) -> Config:
        """The config step ``step`` (0-based) trains with."""
        return self.before if self.at is None or step < self.at else self.after

    def checkpoints_after(self, done: int) -> bool:
        """Whether the loop must checkpoint after ``done`` steps for the switch (the teacher is exported from it)."""
        return done == self.at

    def switch(self, engine, info: DistInfo) -> PureReasonerLM:
        """At step ``relocate_at``: export the model (its checkpoint of that step) as the teacher, load it, restart
        the learning-rate schedule. Every rank calls it; returns the frozen teacher."""
        from pure_reasoner.train import export  # at call time: tests wrap export_from_engine

        found = ds_checkpoint.latest(self.run_dir)
        tag = ds_checkpoint.tag_for(self.at)
        if found is None or found[0] != tag:
            raise RuntimeError(f"relocation at step {self.at} exports checkpoint {tag}, but the latest is "
                               f"{found[0] if found else 'none'}")
        with torch.random.fork_rng():  # building models draws from the RNG the training steps read
            export.export_from_engine(engine, self.cfg, self.run_dir, info, RELOCATION_TEACHER)
            teacher = distill.load_teacher(self.after, self.run_dir, info.rank)
        restart_schedule(engine, self.cfg)
        log.info("step %d: relocation starts, teacher %s", self.at, self.teacher_dir)
        return teacher

    def resumes_past(self, start_step: int) -> bool:
        """Whether a run resumed at ``start_step`` (with steps left) is past the switch."""
        return self.at is not None and self.at < start_step < self.cfg.train.max_steps

    def resume(self, engine, info: DistInfo) -> PureReasonerLM:
        """For a run resumed past the switch: the teacher from ``relocation_teacher`` and the restarted schedule at
        the iteration the checkpoint restored. Raises ValueError when the teacher directory is missing."""
        if not self.teacher_dir.is_dir():
            raise ValueError(f"the run resumes past objective.relocate_at={self.at}, but its teacher "
                             f"{self.teacher_dir} is missing")
        with torch.random.fork_rng():  # the RNG stays as the checkpoint left it
            teacher = distill.load_teacher(self.after, self.run_dir, info.rank)
        restart_schedule(engine, self.cfg, engine.lr_scheduler.last_batch_iteration)
        return teacher
