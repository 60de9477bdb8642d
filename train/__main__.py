"""``python -m pure_reasoner.train [group=option ...] [key=value ...]``: the main training job (Hydra).

Multi-process: ``deepspeed --no_local_rank --num_gpus 2 --module pure_reasoner.train ...`` (ranks read LOCAL_RANK
from the environment; the launcher's ``--local_rank`` argument would collide with Hydra's parser).
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before anything else: it may replace the process (kernels.malloc_tuning)
    from pure_reasoner.kernels.malloc_tuning import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()

# Nothing is downloaded at run time: data, tokenizer and model all come from this machine.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from contextlib import suppress  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pure_reasoner.train.config import register_configs, to_config  # noqa: E402

register_configs()
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def check_config(overrides: Sequence[str]) -> Path | None:
    """Compose and validate the config of ``python -m pure_reasoner.train <overrides>`` before Hydra runs the job.

    Hydra creates the job's output directory (the run dir) before it calls ``main``, so a config rejected
    only there would leave an empty ``runs/<name>/`` behind; checked here first, it writes nothing.

    Returns:
        The run directory Hydra will create (``hydra.run.dir``), or None when the overrides do not compose:
        ``hydra.main`` reports those errors itself, before it creates anything.

    Raises:
        ValueError naming what ``train.config.to_config`` rejects.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        try:
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)  # for ${hydra:...} in the job's keys (experiment names)
            run_dir = Path(str(cfg.hydra.run.dir))
        except Exception:  # composition errors: Hydra's own types, reported by hydra.main below
            return None
        with open_dict(cfg):
            del cfg["hydra"]
        to_config(cfg)
    return run_dir


def discard_run_dir(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but log files: what a run rejected before it wrote anything
    leaves (Hydra's file handler opens its log at the first record, e.g. a data loader's error)."""
    with suppress(OSError):
        entries = list(run_dir.iterdir())
        if all(e.is_file() and e.suffix == ".log" for e in entries):
            for entry in entries:
                entry.unlink()
            run_dir.rmdir()


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float:
    from pure_reasoner.train.dist import exit_rank, multi_rank
    from pure_reasoner.train.loop import TrainingAborted, run

    try:
        config = to_config(cfg)
        summary = run(config, Path(HydraConfig.get().runtime.output_dir), OmegaConf.to_yaml(cfg, resolve=True))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        exit_rank(2)
    except TrainingAborted as err:
        print(f"aborted: {err}", file=sys.stderr)
        exit_rank(3)
    except OSError as err:  # e.g. a full disk while checkpointing; the previous checkpoint stays `latest`
        print(f"error: {err}", file=sys.stderr)
        exit_rank(4)
    except RuntimeError:  # on several ranks: a collective timed out (a hung peer) or a peer died
        if not multi_rank():
            raise
        traceback.print_exc()
        exit_rank(5)
    print(
        f"done: {summary.steps} steps, final loss {summary.final_loss:.4f}, "
        f"median {summary.tokens_per_s:.0f} tokens/s, MFU {summary.mfu:.2%}, {summary.wall_s:.1f} s"
        + (f" (resumed from {summary.resumed_from})" if summary.resumed_from else "")
    )
    if config.train.first_look and int(os.environ.get("RANK", "0")) == 0:
        from pure_reasoner.train.first_look import first_look, render

        report = first_look(Path(HydraConfig.get().runtime.output_dir) / "export", config.train.first_look)
        if report is not None:
            print(render(report))
    return summary.final_loss


if __name__ == "__main__":
    args = sys.argv[1:]
    run_dir = None
    if not any(a.startswith("-") for a in args):  # plain overrides; Hydra's flags (--help, --cfg, -m) go to it as is
        try:
            run_dir = check_config(args)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    fresh = run_dir is not None and not run_dir.exists()
    try:
        main()
    except SystemExit as exit_:
        if exit_.code == 2 and fresh:  # bad input found after Hydra made the run dir (e.g. in the data)
            discard_run_dir(run_dir)
        raise
