"""A recipe's chain: the earlier recipes whose exports it starts from or distils, in the order they must train.

A multi-phase recipe names the models it needs as ``runs/<recipe>-seed${train.seed}/export`` (``train.init_from``,
``objective.teacher``). On a fresh clone none of them exist. ``stages`` reads those paths from the composed configs,
recursively, and lists every earlier recipe (one whose ``conf/experiment/<recipe>.yaml`` exists) before the recipes
that need it, so ``python -m pure_reasoner.train.protocol --chain`` can train the missing ones first, with the same
seed, world and run settings.

Only settings that change how a run runs, not what it learns (``RUN_ONLY_KEYS``), are passed on to earlier stages:
an override meant for the recipe (a loss weight, a learning rate) must not change the models it starts from.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

RUN_ONLY_KEYS = ("train.progress", "train.first_look", "train.threads", "train.gemm_engine")
_EXPORT = re.compile(r"^runs/(?P<recipe>[^/]+)-seed(?P<seed>\d+)/export/?$")


def run_only(overrides: Sequence[str]) -> list[str]:
    """The overrides among ``overrides`` that set one of ``RUN_ONLY_KEYS``."""
    return [o for o in overrides if o.split("=")[0].lstrip("+") in RUN_ONLY_KEYS]


def missing_export(key: str, path) -> str:
    """The error for a missing export ``path`` given as ``key``: when it names an earlier recipe's export
    (``runs/<recipe>-seed<k>/export``), how to train it."""
    message = f"{key}={path} is not a directory"
    match = _EXPORT.match(str(path))
    if match:
        recipe, seed = match["recipe"], match["seed"]
        message += (f": it is recipe {recipe!r}'s model of seed {seed}; train it first with `python -m "
                    f"pure_reasoner.train experiment={recipe} train.seed={seed}` (and this run's world overrides), "
                    "or run this recipe through `python -m pure_reasoner.train.protocol --chain`")
    return message


def needed(cfg, seed: int, experiments: Path) -> list[str]:
    """The recipes whose exports ``cfg`` starts from or distils (``train.init_from``, ``objective.teacher``), for
    paths of the form ``runs/<recipe>-seed<seed>/export`` with a ``<experiments>/<recipe>.yaml``.

    Raises ValueError for such a path whose seed is not ``seed`` (a chain mixes no worlds)."""
    found = []
    for path in (cfg.train.init_from, cfg.objective.teacher):
        match = _EXPORT.match(str(path or ""))
        if not match or not (experiments / f"{match['recipe']}.yaml").is_file():
            continue
        if int(match["seed"]) != seed:
            raise ValueError(f"{path}: a stage of another seed than {seed}")
        if match["recipe"] not in found:
            found.append(match["recipe"])
    return found


def stages(cfg, seed: int, compose_recipe: Callable[[str], object], experiments: Path) -> list[str]:
    """Every earlier recipe the run configured by ``cfg`` needs, each after the ones it needs.

    Args:
        cfg: the run's composed training Config.
        compose_recipe: recipe name -> its composed training Config for this seed.
        experiments: the ``conf/experiment`` directory.

    Raises:
        ValueError: a chain that loops.
    """
    order: list[str] = []

    def visit(name: str, stage_cfg, path: tuple[str, ...]) -> None:
        for earlier in needed(stage_cfg, seed, experiments):
            if earlier in path or earlier == name:
                raise ValueError(f"recipe chain loops: {' -> '.join((*path, name, earlier))}")
            if earlier not in order:
                visit(earlier, compose_recipe(earlier), (*path, name))
        if path:
            order.append(name)

    visit(cfg.name, cfg, ())
    return order
